"""Image folders, tar shards and caption corpora: decoding, skipping bad records, seeding."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import lverse.data.images as images_mod
from lverse.data import (
    BadImageWarning,
    CaptionFolderDataset,
    CocoKarpathyDataset,
    ConceptualCaptionsDataset,
    ImageFolderDataset,
    ImageTransform,
    TarCaptionDataset,
    TarShardDataset,
    build_caption_dataset,
    build_image_dataset,
    collate_skip_none,
    to_rgb,
    write_tar_shards,
)
from lverse.data.images import Skipped
from lverse.shapes.scenes import Scene, ShapesCaptionDataset, ShapesDataset, phrasings

R = 16


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    _noise(40, 30).save(root / "a_rgb.png")
    Image.new("L", (20, 20), 128).save(root / "b_gray.png")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent → white
    rgba.save(root / "c_rgba.png")
    Image.new("RGB", (20, 20), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "d_pal.png")
    Image.fromarray(np.full((20, 20), 257 * 60, dtype=np.uint16)).save(root / "e_16bit.png")  # I;16
    (root / "f_corrupt.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "g_empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


# --- colour conversion ------------------------------------------------------------------------
def test_to_rgb_modes() -> None:
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    half = to_rgb(Image.new("LA", (2, 2), (0, 128))).getpixel((0, 0))
    assert all(abs(c - 127) <= 1 for c in half)  # black at 50% alpha over white
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert i16.mode == "I;16"
    assert [to_rgb(i16).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert i32.mode == "I" and to_rgb(i32).getpixel((1, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0  # index 0 is transparent → white
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


# --- folders ----------------------------------------------------------------------------------
def test_folder_dataset_decodes_and_skips(mixed_folder: Path) -> None:
    ds = ImageFolderDataset(mixed_folder, resolution=R, train=False)
    names = [p.name for p in ds.files]
    assert names == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_pal.png", "e_16bit.png", "f_corrupt.jpg", "g_empty.png"]
    assert ds.classes == [] and ds.labels == [-1] * 7

    with pytest.warns(BadImageWarning, match="f_corrupt.jpg"):
        assert ds[5] == Skipped("bad_image", str(mixed_folder / "f_corrupt.jpg"))
    with pytest.warns(BadImageWarning, match="g_empty.png"):
        assert ds[6] == Skipped("bad_image", str(mixed_folder / "g_empty.png"))
    with warnings.catch_warnings():  # warned once per file: no second warning
        warnings.simplefilter("error", BadImageWarning)
        assert isinstance(ds[5], Skipped)
    assert ds.skip_summary() == {"bad_image": 3}

    good = {n: ds[i]["image"] for i, n in enumerate(names[:5])}
    for t in good.values():
        assert t.shape == (3, R, R) and t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1
    assert np.all(_to_uint8(good["b_gray.png"]) == 128)
    assert np.all(_to_uint8(good["c_rgba.png"]) == 255)
    assert np.all(np.abs(_to_uint8(good["d_pal.png"]).astype(int) - [0, 200, 0]) <= 3)
    assert np.all(_to_uint8(good["e_16bit.png"]) == 60)
    # Eval transform = centre square of the shorter side, resized: compare with PIL directly.
    ref = Image.open(mixed_folder / "a_rgb.png").convert("RGB").resize((R, R), Image.Resampling.BICUBIC, box=(5, 0, 35, 30))
    assert np.array_equal(_to_uint8(good["a_rgb.png"]), np.asarray(ref))


def test_folder_dataloader_counts_skipped(mixed_folder: Path) -> None:
    ds = ImageFolderDataset(mixed_folder, resolution=R, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_none))
    assert [b["batch_size"] for b in batches] == [4, 1]
    assert [b["skipped"] for b in batches] == [0, 2] and batches[1]["skipped_by"] == {"bad_image": 2}
    assert batches[0]["image"].shape == (4, 3, R, R)
    assert batches[1]["index"].tolist() == [4] and batches[0]["label"].tolist() == [-1] * 4


def test_collate_all_bad_batch() -> None:
    bad = [Skipped("bad_image", "a"), None, Skipped("missing_caption", "b"), Skipped("bad_image", "c")]
    assert collate_skip_none(bad) == {"batch_size": 0, "skipped": 4,
                                      "skipped_by": {"bad_image": 2, "unreadable": 1, "missing_caption": 1}}


def test_class_folder_layout(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog" / "sub").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    _noise(8, 8).save(tmp_path / "cat" / "x.png")
    _noise(8, 8, 1).save(tmp_path / "dog" / "sub" / "y.JPG", format="JPEG")
    _noise(8, 8, 2).save(tmp_path / "dog" / "z.WebP", format="WEBP")
    _noise(8, 8).save(tmp_path / ".hidden" / "h.png")
    (tmp_path / "dog" / "readme.md").write_text("x")
    ds = ImageFolderDataset(tmp_path, resolution=8, train=False)
    assert [p.as_posix() for p in ds.files] == ["cat/x.png", "dog/sub/y.JPG", "dog/z.WebP"]
    assert ds.classes == ["cat", "dog"] and ds.labels == [0, 1, 1]
    assert ds[1]["label"] == 1 and ds[1]["image"].shape == (3, 8, 8)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", resolution=R)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found"):
        ImageFolderDataset(tmp_path, resolution=R)


# --- reproducible augmentation --------------------------------------------------------------
def test_reproducible_crop_with_index_seed(tmp_path: Path) -> None:
    _noise(40, 40).save(tmp_path / "sq.png")
    _noise(48, 32, 1).save(tmp_path / "wide.png")
    ds = ImageFolderDataset(tmp_path, resolution=R, train=True, seed=7)
    for index in (0, 1):
        a, b = ds[(index, 5)]["image"], ds[(index, 5)]["image"]
        assert torch.equal(a, b)
        crops = {ds[(index, s)]["image"].numpy().tobytes() for s in range(12)}
        assert len(crops) >= 3
    # The crop equals a reference computation with the same generator.
    t = ImageTransform(R, train=True)
    g_seed = images_mod.derive_seed("lverse-aug", 7, 0, 5)
    left, top, w, h = t.crop_box(40, 40, torch.Generator().manual_seed(g_seed))
    assert 0.75 * 1600 - 80 <= w * h <= 1600 and w == h
    ref = Image.open(tmp_path / "sq.png").convert("RGB").resize((R, R), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    assert np.array_equal(_to_uint8(ds[(0, 5)]["image"]), np.asarray(ref))
    # Non-square images still get a random (not centre-only) square crop.
    boxes = {t.crop_box(48, 32, torch.Generator().manual_seed(s)) for s in range(30)}
    assert all(w == h == 32 for _, _, w, h in boxes) and len({b[0] for b in boxes}) > 3


# --- tar shards -------------------------------------------------------------------------------
def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shard_samples() -> list[dict]:
    out = []
    for k in range(5):
        sample = {"__key__": f"s{k:03d}", "jpg": _jpeg(_noise(24, 20, k)), "txt": f"caption {k}", "cls": k % 2}
        out.append(sample)
    out[2]["jpg"] = b"\x00garbage not a jpeg"
    out[4] = {"__key__": "s004", "png": _noise(20, 20, 4), "cls": 0, "txt": ""}
    return out


def test_tar_round_trip_with_corrupt_member(tmp_path: Path) -> None:
    paths = write_tar_shards(_shard_samples(), tmp_path / "shards", samples_per_shard=3)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    assert paths[0].read_bytes() == write_tar_shards(_shard_samples(), tmp_path / "again", samples_per_shard=3)[0].read_bytes()

    ds = TarShardDataset(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), resolution=R, train=False)
    with pytest.warns(BadImageWarning, match="s002"):
        items = list(ds)
    assert len(items) == 5 and items[2] == Skipped("bad_image", "shard-000000/s002")
    good = [it for it in items if not isinstance(it, Skipped)]
    assert [it["key"] for it in good] == ["shard-000000/s000", "shard-000000/s001", "shard-000001/s003", "shard-000001/s004"]
    assert [it["label"] for it in good] == [0, 1, 1, 0]
    assert ds.skip_summary() == {"bad_image": 1}
    ref = Image.open(io.BytesIO(_jpeg(_noise(24, 20, 0)))).convert("RGB")
    ref = ref.resize((R, R), Image.Resampling.BICUBIC, box=(2, 0, 22, 20))
    assert np.array_equal(_to_uint8(good[0]["image"]), np.asarray(ref))
    ref4 = _noise(20, 20, 4).resize((R, R), Image.Resampling.BICUBIC)
    assert np.array_equal(_to_uint8(good[3]["image"]), np.asarray(ref4))  # PNG: lossless

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batches = list(DataLoader(TarShardDataset(tmp_path / "shards", resolution=R, train=False),
                                  batch_size=3, collate_fn=collate_skip_none))
    assert sum(b["batch_size"] for b in batches) == 4 and sum(b["skipped"] for b in batches) == 1


def test_tar_split_across_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [{"__key__": f"k{k}", "png": _noise(8, 8, k)} for k in range(7)]
    write_tar_shards(samples, tmp_path / "many", samples_per_shard=2)  # 4 shards
    write_tar_shards(samples, tmp_path / "one", samples_per_shard=10)  # 1 shard
    for sub in ("many", "one"):
        seen = []
        for cid in range(3):
            monkeypatch.setattr(images_mod, "_consumer", lambda cid=cid: (cid, 3))
            keys = [it["key"].split("/")[-1] for it in TarShardDataset(tmp_path / sub, resolution=8, train=True, seed=3)]
            assert keys, f"reader {cid} of {sub} got nothing"
            seen += keys
        assert sorted(seen) == [f"k{k}" for k in range(7)], sub
    monkeypatch.undo()
    # Real DataLoader workers partition the stream too.
    ds = TarShardDataset(tmp_path / "many", resolution=8, train=False)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(k.split("/")[-1] for k in keys) == [f"k{k}" for k in range(7)]


def test_tar_train_is_seeded_and_damaged_shard_survives(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{k}", "png": _noise(20, 20, k)} for k in range(6)]
    paths = write_tar_shards(samples, tmp_path / "s", samples_per_shard=3)
    ds = TarShardDataset(tmp_path / "s", resolution=8, train=True, seed=1, shuffle_buffer=4)
    a, b = list(ds), list(ds)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    ds.set_epoch(1)
    c = list(ds)
    assert sorted(x["key"] for x in c) == sorted(x["key"] for x in a)
    assert any(not torch.equal(x["image"], y["image"]) for x, y in
               zip(sorted(a, key=lambda t: t["key"]), sorted(c, key=lambda t: t["key"])))
    # Truncate the second shard mid-member: earlier samples still come out, no crash.
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: 512 + 300])
    ds = TarShardDataset(tmp_path / "s", resolution=8, train=False)
    with pytest.warns(BadImageWarning, match="shard-000001"):
        items = list(ds)
    assert [x["key"] for x in items[:3]] == ["shard-000000/k0", "shard-000000/k1", "shard-000000/k2"]
    assert items[3:] == [Skipped("bad_shard", str(paths[1]))]  # counted with the batch it lands in
    assert ds.skip_summary() == {"bad_shard": 1}


def test_a_shard_cut_between_members_is_counted(tmp_path: Path) -> None:
    """tarfile reads a shard cut exactly at a member boundary as a short, healthy one; the
    missing end-of-archive block gives it away: its samples before the cut come out, and the
    shard is a bad_shard (warned and counted), not a silent loss."""
    import tarfile

    samples = [{"__key__": f"k{k}", "png": _noise(20, 20, k)} for k in range(4)]
    (path,) = write_tar_shards(samples, tmp_path / "s", samples_per_shard=4)
    with tarfile.open(path) as tf:
        cut = tf.getmembers()[2].offset
    full = path.read_bytes()
    path.write_bytes(full[:cut])
    ds = TarShardDataset(path, resolution=8, train=False)
    with pytest.warns(BadImageWarning, match="truncated"):
        items = list(ds)
    assert [x["key"] for x in items[:2]] == ["shard-000000/k0", "shard-000000/k1"]
    assert items[2:] == [Skipped("bad_shard", str(path))] and ds.skip_summary() == {"bad_shard": 1}
    path.write_bytes(full[: len(full) - 512])  # one end block of the two is enough: complete
    assert len(list(TarShardDataset(path, resolution=8, train=False))) == 4


def test_shard_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tar shards match"):
        TarShardDataset(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="only local"):
        TarShardDataset("https://example.com/x.tar")


# --- caption corpora --------------------------------------------------------------------------
def test_coco_karpathy(tmp_path: Path) -> None:
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    _noise(30, 20, 0).save(tmp_path / "train2014" / "a.jpg")
    _noise(30, 20, 1).save(tmp_path / "val2014" / "b.jpg")
    _noise(30, 20, 2).save(tmp_path / "val2014" / "c.jpg")

    def entry(cocoid: int, filepath: str, filename: str, split: str, raws: list[str]) -> dict:
        return {"cocoid": cocoid, "filepath": filepath, "filename": filename, "split": split,
                "sentences": [{"raw": r, "tokens": r.split()} for r in raws]}

    five = [f"caption number {i}." for i in range(5)]
    data = {"images": [
        entry(1, "train2014", "a.jpg", "train", five),
        entry(2, "val2014", "b.jpg", "restval", five[:4] + ["   "]),
        entry(3, "val2014", "c.jpg", "test", five),
        entry(4, "val2014", "missing.jpg", "train", five),
        entry(5, "val2014", "c.jpg", "train", ["", " "]),
    ], "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))

    with pytest.warns(BadImageWarning, match="dataset_coco.json:5 .empty_caption"):
        ds = CocoKarpathyDataset(tmp_path / "dataset_coco.json", tmp_path, split="train", resolution=R)
    assert len(ds) == 3 and ds.skip_summary() == {"empty_caption": 1, "dropped_captions": 1}
    assert ds[0]["captions"] == five and ds[0]["key"] == "1" and ds[0]["image"].shape == (3, R, R)
    assert ds[1]["captions"] == five[:4]
    with pytest.warns(BadImageWarning, match="missing.jpg"):
        assert ds[2] == Skipped("missing_image", str(tmp_path / "val2014" / "missing.jpg"))
    assert ds.skip_summary()["missing_image"] == 1
    test = CocoKarpathyDataset(tmp_path / "dataset_coco.json", tmp_path, split="test", load_images=False)
    assert len(test) == 1 and test[0] == {"image": None, "captions": five, "key": "3", "id": "3"}
    with pytest.raises(ValueError, match="split"):
        CocoKarpathyDataset(tmp_path / "dataset_coco.json", tmp_path, split="dev")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        CocoKarpathyDataset(tmp_path / "bad.json", tmp_path)


def test_conceptual_captions_tsv(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _noise(20, 20).save(tmp_path / "img" / "0.png")
    _noise(20, 20, 1).save(tmp_path / "img" / "1.png")
    lines = [
        b"a photo of a dog\timg/0.png",
        b"   \timg/1.png",  # empty caption
        b"a photo of nothing\timg/none.png",  # missing image
        b"\xff\xfe broken text\timg/1.png",  # not UTF-8
        b"no tab here",
        b"",
        b"a red car\timg/1.png\r",
    ]
    (tmp_path / "cc.tsv").write_bytes(b"\n".join(lines))
    with pytest.warns(BadImageWarning) as record:
        ds = ConceptualCaptionsDataset(tmp_path / "cc.tsv", tmp_path, resolution=R)
    assert sorted(str(w.message).split(" ")[1].rsplit(":", 1)[1] for w in record) == ["2", "4", "5"]
    assert len(ds) == 3
    assert ds.skip_summary() == {"empty_caption": 1, "bad_text": 1, "bad_line": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        batch = collate_skip_none([ds[i] for i in range(len(ds))])
    assert batch["batch_size"] == 2 and batch["skipped"] == 1
    assert batch["captions"] == [["a photo of a dog"], ["a red car"]] and batch["key"] == ["img/0.png", "img/1.png"]
    assert batch["image"].shape == (2, 3, R, R)
    assert ds.skip_summary()["missing_image"] == 1


def test_caption_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _noise(20, 20).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\n\n  second caption  \n")
    _noise(20, 20, 1).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("\n  \n")
    _noise(20, 20, 2).save(tmp_path / "sub" / "c.jpg")  # no caption file
    _noise(20, 20, 3).save(tmp_path / "sub" / "d.png")
    (tmp_path / "sub" / "d.txt").write_bytes(b"\xff\xfe\xfa")
    ds = CaptionFolderDataset(tmp_path, resolution=R)
    assert [r[0] for r in ds.records] == ["a.png", "b.png", "sub/c.jpg", "sub/d.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        items = [ds[i] for i in range(4)]
    assert items[0]["captions"] == ["first caption", "second caption"] and items[0]["key"] == "a.png"
    assert [it.reason for it in items[1:]] == ["empty_caption", "missing_caption", "bad_text"]
    assert ds.skip_summary() == {"empty_caption": 1, "missing_caption": 1, "bad_text": 1}


def test_tar_captions(tmp_path: Path) -> None:
    write_tar_shards(_shard_samples(), tmp_path, samples_per_shard=10)
    ds = TarCaptionDataset(tmp_path, resolution=R, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        items = list(ds)
    good = [it for it in items if not isinstance(it, Skipped)]
    assert [it["captions"] for it in good] == [["caption 0"], ["caption 1"], ["caption 3"]]
    assert ds.skip_summary() == {"bad_image": 1, "empty_caption": 1}


def test_shapes_captions_and_registry(tmp_path: Path) -> None:
    write_tar_shards([{"__key__": "k", "png": _noise(8, 8)}], tmp_path)
    ds = build_caption_dataset("shapes", split="test", size=5, seed=2, resolution=32)
    assert isinstance(ds, ShapesCaptionDataset)
    item = ds[1]
    assert item["captions"] == phrasings(Scene.from_dict(item["scene"])) and item["key"] == "shapes/test/1"
    assert torch.equal(item["image"], ShapesDataset("test", size=5, seed=2, resolution=32)[1]["image"])
    no_img = ShapesCaptionDataset("test", size=5, seed=2, load_images=False)[1]
    assert no_img["image"] is None and no_img["captions"] == item["captions"]

    assert isinstance(build_image_dataset("shapes", size=3), ShapesDataset)
    assert isinstance(build_image_dataset("tar", root=tmp_path, resolution=8, train=True), TarShardDataset)
    with pytest.raises(ValueError, match="valid kinds: folder, tar, shapes"):
        build_image_dataset("imagenet")
    with pytest.raises(ValueError, match="valid kinds: coco, cc, folder, tar, shapes"):
        build_caption_dataset("laion")
    with pytest.raises(TypeError, match="ShapesDataset"):
        build_image_dataset("shapes", resolutoin=32)


# --- one image path: encoding, training and sampling read a file the same way ---------------------
_MODES = {"1": "png", "L": "png", "LA": "png", "P": "png", "PA": "tiff", "RGB": "png", "RGBA": "png",
          "CMYK": "tiff", "I": "tiff", "I;16": "png", "F": "tiff", "YCbCr": "tiff"}


def _image_in_mode(mode: str, w: int = 45, h: int = 30) -> Image.Image:
    """A non-square image with content in every channel, in PIL ``mode``."""
    rgb = _noise(w, h, seed=len(mode))
    if mode in ("I", "I;16", "F"):
        a = np.asarray(rgb.convert("L"), dtype=np.float64)
        if mode == "F":
            return Image.fromarray((a / 255.0).astype(np.float32), "F")  # [0, 1] floats
        scaled = a * 257 if mode == "I;16" else a  # I: 8-bit values stored in 32-bit ints
        return Image.fromarray(scaled.astype(np.uint16 if mode == "I;16" else np.int32))  # mode from the dtype
    if mode == "PA":
        return rgb.convert("P").convert("PA")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_encode_and_sample_read_every_mode_identically(mode: str, tmp_path: Path) -> None:
    from lverse.data.images import read_image

    img = _image_in_mode(mode)
    path = tmp_path / f"x.{_MODES[mode]}"
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == mode  # the file really holds that mode
    (tmp_path / "x.txt").write_text("a caption\n")
    sampled = read_image(path, R)  # what sample.py --image and the pipeline feed the AugVAE
    encoded = build_caption_dataset("folder", root=tmp_path, resolution=R)[0]["image"]  # lverse encode
    folder = ImageFolderDataset(tmp_path, resolution=R, train=False)[0]["image"]  # stage-1 evaluation grids
    assert sampled.shape == (3, R, R) and torch.equal(sampled, encoded) and torch.equal(sampled, folder)


def test_high_bit_depth_and_float_values_are_read_as_their_level(tmp_path: Path) -> None:
    # The two readers used to disagree here: an "I" value of 200 read as 200 and as 255, an "F"
    # value of 0.5 as 128 and as 0. One reader: 200 stays 200, 0.5 of [0, 1] is 128, 65535 // 4 is 64.
    from lverse.data.images import read_image

    cases = [("I", np.full((8, 8), 200, np.int32), 200), ("F", np.full((8, 8), 0.5, np.float32), 128),
             ("I;16", np.full((8, 8), 65535 // 4, np.uint16), 64)]
    for mode, arr, level in cases:
        Image.fromarray(arr).save(tmp_path / f"{mode.replace(';', '')}.tiff")  # mode from the dtype
        x = read_image(tmp_path / f"{mode.replace(';', '')}.tiff", 8)
        assert torch.equal(x, torch.full((3, 8, 8), float(level)).div(127.5).sub(1.0)), mode


def test_lanczos_resize_for_evaluation(tmp_path: Path) -> None:
    from lverse.data.images import read_image

    _noise(451, 300).save(tmp_path / "photo.png")
    lanczos, bicubic = read_image(tmp_path / "photo.png", R, "lanczos"), read_image(tmp_path / "photo.png", R)
    # centre square of the shorter side, resized with PIL's LANCZOS filter
    left = (451 - 300) // 2
    ref = _noise(451, 300).resize((R, R), Image.Resampling.LANCZOS, box=(left, 0, left + 300, 300))
    assert torch.equal(lanczos, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    assert not torch.equal(lanczos, bicubic)
    with pytest.raises(ValueError, match="resample"):
        read_image(tmp_path / "photo.png", R, "nearest")

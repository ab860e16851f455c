"""`lverse encode` on small fakes of the real corpora's layouts: CC3M as distributed (a URL TSV)
and as img2dataset writes it (webdataset and files layouts), COCO's Karpathy JSON with bad
records; counts by kind, failure on nothing or too much bad, ids and every reference kept in the
shards, duplicate ids, and several crops per image drawn per epoch."""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lverse.shapes  # noqa: F401  (registers --data shapes)
from lverse.cli.encode import main as encode
from lverse.data.captions import ConceptualCaptionsDataset, clean_caption, img2dataset_corpus
from lverse.data.images import BadImageWarning, ImageTransform, crop_views, derive_seed, load_image
from lverse.data.tokens import TokenDataset, read_meta
from lverse.models.augvae import AugVAE, AugVAEConfig
from lverse.train.sampler import ResumableSampler

R = 32


@pytest.fixture(scope="module")
def sl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = AugVAE(AugVAEConfig(variant="sl", resolution=R, hidden_dim=32, ch_mult=(1, 1), num_res_blocks=1,
                                z_channels=8, codebook_size=32, codebook_dim=8, num_levels=3))
    return model.save(tmp_path_factory.mktemp("sl") / "sl.safetensors")


def _jpeg(seed: int, w: int = 40, h: int = 30) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        rc = encode([*args, "--num-workers", "0", "--device", "cpu", "--batch-size", "4"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def _img2dataset_samples(n: int, bad: int = -1) -> list[tuple[str, dict[str, bytes]]]:
    """What img2dataset writes per sample: key.jpg, key.txt (the caption), key.json (its metadata)."""
    out = []
    for i in range(n):
        key = f"{i:09d}"
        meta = {"url": f"https://example.com/img/{i}.jpg", "caption": f"picture number {i}", "key": key,
                "status": "success", "width": 40, "height": 30}
        jpg = b"\xff\xd8 truncated" if i == bad else _jpeg(i)
        out.append((key, {"jpg": jpg, "txt": f"picture number {i}".encode(), "json": json.dumps(meta).encode()}))
    return out


def test_the_url_tsv_cc3m_ships_as_is_refused_with_what_to_do(sl: Path, tmp_path: Path, capsys) -> None:
    tsv = tmp_path / "Train_GCC-training.tsv"  # caption<TAB>URL, no header: the real file's form
    tsv.write_text("".join(f"a photo number {i}\thttp://example.com/{i}.jpg\n" for i in range(10)))
    rc, out, err = _run(["--augvae", str(sl), "--data", "cc", "--path", str(tsv), "--out", str(tmp_path / "t")], capsys)
    assert rc == 2 and out is None
    assert "Train_GCC-training.tsv:1" in err and "img2dataset" in err and "--data cc --path" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_img2dataset_output_encodes_with_urls_as_ids(layout: str, sl: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cc3m"
    folder.mkdir()
    samples = _img2dataset_samples(6, bad=2)
    if layout == "webdataset":
        with tarfile.open(folder / "00000.tar", "w") as tf:
            for key, parts in samples:
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    else:
        (folder / "00000").mkdir()
        for key, parts in samples:
            for ext, data in parts.items():
                (folder / "00000" / f"{key}.{ext}").write_bytes(data)
    (folder / "00000_stats.json").write_text(json.dumps({"count": 8, "successes": 6, "failed_to_download": 2}))
    rc, out, _ = _run(["--augvae", str(sl), "--data", "cc", "--path", str(folder), "--out", str(tmp_path / "t"),
                       "--max-bad-share", "0.2"], capsys)
    assert rc == 0 and out["num_items"] == 5 and out["skipped_by"] == {"bad_image": 1} and out["records"] == 6
    ds = TokenDataset(tmp_path / "t")
    assert [ds.references(i) for i in range(5)] == [
        (f"https://example.com/img/{i}.jpg", [f"picture number {i}"]) for i in (0, 1, 3, 4, 5)]
    # one bad record in six is over the default bar of 5%: the shards are written, the exit says so
    rc, out, err = _run(["--augvae", str(sl), "--data", "cc", "--path", str(folder), "--out", str(tmp_path / "u")],
                        capsys)
    assert rc == 2 and out["num_items"] == 5 and "1 of 6 records were bad" in err and "bad_image 1" in err
    assert read_meta(tmp_path / "u")["bad_share"] == pytest.approx(1 / 6)


def _coco(tmp_path: Path) -> Path:
    (tmp_path / "val2014").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "val2014" / f"{name}.jpg").write_bytes(_jpeg(ord(name)))

    def entry(cocoid: object, filename: object, raws: list) -> dict:
        return {"cocoid": cocoid, "filepath": "val2014", "filename": filename, "split": "test",
                "sentences": [{"raw": r} for r in raws]}

    five = [f"caption {i} of the picture." for i in range(5)]
    images = [entry(1, "a.jpg", five), entry(2, "b.jpg", five[:3] + ["", "\x00"]), entry(3, "missing.jpg", five),
              entry(4, None, five), entry(5, "c.jpg", ["\x00", " \x1b "]), entry(1, "c.jpg", five[::-1])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return tmp_path / "dataset_coco.json"


def test_coco_counts_every_dropped_record_by_kind_and_keeps_ids_and_references(sl: Path, tmp_path: Path,
                                                                               capsys) -> None:
    path = _coco(tmp_path)
    args = ["--augvae", str(sl), "--data", "coco", "--path", str(path), "--image-root", str(tmp_path), "--split",
            "test", "--out", str(tmp_path / "t")]
    rc, out, err = _run(args, capsys)
    # cocoid 3: no image file; 4: no filename; 5: only empty captions ("\x00" and an escape count as empty)
    assert out["skipped_by"] == {"empty_caption": 1, "missing_image": 2} and out["num_items"] == 3
    assert out["records"] == 6 and out["dropped_captions"] == 2 and out["duplicate_ids"] == 1
    assert rc == 2 and "3 of 6 records were bad" in err and "repeat an id" in err and "'1'" in err
    meta = read_meta(tmp_path / "t")
    assert meta["skipped"] == 3 and meta["duplicate_examples"] == ["1"]
    ds = TokenDataset(tmp_path / "t")
    five = [f"caption {i} of the picture." for i in range(5)]
    assert [ds.references(i) for i in range(3)] == [("1", five), ("2", five[:3]), ("1", five[::-1])]
    rc, _, _ = _run([*args[:-1], str(tmp_path / "ok"), "--max-bad-share", "0.5"], capsys)
    assert rc == 0


def test_nothing_encoded_is_an_error(sl: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"not a jpeg")
        (tmp_path / "imgs" / f"{i}.txt").write_text("a caption")
    rc, out, err = _run(["--augvae", str(sl), "--data", "folder", "--path", str(tmp_path / "imgs"),
                         "--out", str(tmp_path / "t"), "--max-bad-share", "1"], capsys)
    assert rc == 2 and out["num_items"] == 0
    assert "encoded nothing: 3 record(s), all skipped (bad_image 3)" in err


def test_cc_tsv_lines_are_counted_by_kind(tmp_path: Path) -> None:
    (tmp_path / "4.png").write_bytes(_jpeg(4))
    (tmp_path / "cc.tsv").write_text("x\ty\tz\t4.png\n\x00\t4.png\na dog\t4.png\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        ds = ConceptualCaptionsDataset(tmp_path / "cc.tsv", tmp_path, resolution=R)
    assert [r[0] for r in ds.records] == ["4.png"] and ds.records[0][2] == ["a dog"]
    assert ds.skip_summary() == {"bad_line": 1, "empty_caption": 1}
    assert clean_caption(" a\x00red\u200b car\n") == "a red car" and clean_caption(b"bytes") == ""


def test_crops_are_stored_and_drawn_per_epoch(sl: Path, tmp_path: Path, capsys) -> None:
    args = ["--augvae", str(sl), "--data", "shapes", "--size", "12", "--seed", "3"]
    assert _run([*args, "--out", str(tmp_path / "one")], capsys)[0] == 0
    rc, out, _ = _run([*args, "--out", str(tmp_path / "three"), "--crops", "3"], capsys)
    assert rc == 0 and out["crops"] == 3
    one, three = TokenDataset(tmp_path / "one"), TokenDataset(tmp_path / "three")
    codes = np.load(tmp_path / "three" / "codes_00000.npy")
    assert codes.shape == (12, 3, 64)
    # crop 0 is the centre crop: the codes of the plain encoding
    assert np.array_equal(codes[:, 0], np.load(tmp_path / "one" / "codes_00000.npy"))
    assert torch.equal(three[4]["codes"], one[4]["codes"])  # no seed: the centre crop
    # the crops are the paper's random resized crops, fixed by the image, not by the run
    picture = lverse.shapes.scenes.render(lverse.shapes.ShapesDataset("train", 12, 3, R).scene(4), R)
    views = crop_views(picture, R, 3, 3, "shapes/train/4")
    g = torch.Generator().manual_seed(derive_seed("lverse-crops", 3, "shapes/train/4", 2))
    assert torch.equal(views[2], ImageTransform(R, train=True)(picture, g))
    # each epoch draws a crop per item from the sampler's seed: the same after a resume
    sampler = ResumableSampler(len(three), seed=0)
    picks = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        picks.append([int(np.flatnonzero((codes[k] == three[(k, s)]["codes"].numpy()).all(1))[0]) for k, s in keys])
        sampler.set_epoch(epoch, start=5)  # a run resumed after 5 items of this epoch
        assert [three[key]["codes"].tolist() for key in sampler] == [three[key]["codes"].tolist() for key in keys[5:]]
    assert {p for epoch in picks for p in epoch} == {0, 1, 2} and picks[0] != picks[1]


def test_img2dataset_corpus_picks_the_layout(tmp_path: Path) -> None:
    (tmp_path / "files" / "00000").mkdir(parents=True)
    for key, parts in _img2dataset_samples(2):
        for ext, data in parts.items():
            (tmp_path / "files" / "00000" / f"{key}.{ext}").write_bytes(data)
    ds = img2dataset_corpus(tmp_path / "files", resolution=R)
    assert [ds[i]["id"] for i in range(2)] == ["https://example.com/img/0.jpg", "https://example.com/img/1.jpg"]
    assert torch.equal(ds[0]["image"], ImageTransform(R, train=False)(load_image(_jpeg(0))))
    with pytest.raises(FileNotFoundError, match="img2dataset output folder"):
        img2dataset_corpus(tmp_path / "nowhere")

"""Image–caption corpora for stage 2 (BiART), all yielding one item format.

Every dataset here yields ``{"image", "captions", "key", "id"}``: ``image`` is a tensor 3×R×R in
[-1, 1] (``crops=K > 1``: K×3×R×R, the centre crop then K-1 random resized crops, the paper's
augmentation), or ``None`` when built with ``load_images=False``; ``captions`` is *every*
reference caption of the image; ``key`` names the record in its corpus (a path, a shard member)
and ``id`` is what evaluation traces it by (COCO's ``cocoid``, the image URL of a CC3M download,
else the key). Bad records follow the convention of :mod:`lverse.data.images`: the item is a
:class:`~lverse.data.images.Skipped`, a :class:`~lverse.data.images.BadImageWarning` names it
once, and :func:`~lverse.data.images.collate_skip_none` drops and counts it by reason.

Where a check can be made from text already in memory (COCO JSON, CC TSV) the bad record is
removed when the dataset is built and counted in :meth:`skip_summary`; checks that need a file
read (images, caption ``.txt`` files, tar members) happen on access. Reasons: ``empty_caption``,
``bad_text``, ``bad_line``, ``missing_image``, ``bad_image``, ``missing_caption``, ``bad_shard``;
``dropped_captions`` counts single empty sentences removed from a record that still has others.

Conceptual Captions is distributed as ``caption<TAB>image URL`` lines: download it with
img2dataset first, then read its output folder (``files`` or ``webdataset`` layout) with
:func:`img2dataset_corpus`. A TSV of local paths (``caption<TAB>path``) is read by
:class:`ConceptualCaptionsDataset`, which refuses a URL TSV and says what to do.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from lverse.data.images import (
    ImageTransform,
    Skipped,
    SkipTracker,
    TarShardDataset,
    access_generator,
    check_dir,
    crop_views,
    list_images,
    load_image,
    pick_image,
    split_key,
)

URL_PREFIXES = ("http://", "https://")


def clean_caption(text: Any) -> str:
    """A caption with control characters (NUL, escapes, zero-width marks) removed and blanks
    folded; ``""`` for anything that is not text or holds no printable character."""
    if not isinstance(text, str):
        return ""
    kept = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text
                   if unicodedata.category(c) != "Cf")
    return " ".join(kept.split())


def _clean(captions: Sequence[Any]) -> tuple[list[str], int]:
    """Clean captions, drop empty ones; returns (kept, number dropped)."""
    kept = [c for c in map(clean_caption, captions) if c]
    return kept, len(captions) - len(kept)


def _url_of(meta_json: bytes | str | None) -> str | None:
    """The ``url`` in an img2dataset sample's ``.json``, if it is readable and has one."""
    if meta_json is None:
        return None
    try:
        data = json.loads(meta_json)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) and url else None


class _FileCaptionDataset(Dataset, SkipTracker):
    """Map-style base: ``records[i] = (key, image path, captions, id)``; images loaded on access."""

    def __init__(self, resolution: int, train: bool, load_images: bool, seed: int,
                 scale: tuple[float, float] = (0.75, 1.0), crops: int = 1) -> None:
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        self.transform = ImageTransform(resolution, train, scale)
        self.resolution, self.scale, self.crops = resolution, scale, crops
        self.load_images, self.seed = load_images, seed
        self.records: list[tuple[str, Path, list[str], str]] = []
        self._init_skips()

    def __len__(self) -> int:
        return len(self.records)

    def _captions(self, index: int) -> list[str] | Skipped:
        return self.records[index][2]

    def _id(self, index: int) -> str:
        return self.records[index][3]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | Skipped:
        index, access_seed = split_key(key)
        name, path, _, _ = self.records[index]
        captions = self._captions(index)
        if isinstance(captions, Skipped):
            return captions
        image = None
        if self.load_images:
            if not path.is_file():
                return self._skip("missing_image", str(path), "file not found")
            try:
                img = load_image(path)
                if self.crops > 1:
                    image = crop_views(img, self.resolution, self.crops, self.seed, name, scale=self.scale)
                else:
                    image = self.transform(img, access_generator(self.seed, index, access_seed))
            except Exception as e:
                return self._skip("bad_image", str(path), e)
        return {"image": image, "captions": captions, "key": name, "id": self._id(index)}


class CocoKarpathyDataset(_FileCaptionDataset):
    """MS-COCO with Karpathy's splits (``dataset_coco.json``); ``id`` is the ``cocoid``.

    Image ``i`` is read from ``image_root / filepath / filename`` (``filepath`` is e.g.
    ``val2014``; omitted when absent). ``split="train"`` includes ``restval`` (the usual
    113k-image training set); ``"val"``, ``"test"``, ``"restval"`` or ``"all"`` otherwise.
    """

    SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"},
              "restval": {"restval"}, "all": {"train", "restval", "val", "test"}}

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        split: str = "train",
        resolution: int = 256,
        train: bool = False,
        load_images: bool = True,
        seed: int = 0,
        crops: int = 1,
    ) -> None:
        super().__init__(resolution, train, load_images, seed, crops=crops)
        if split not in self.SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; valid: {sorted(self.SPLITS)}")
        json_path, self.image_root = Path(json_path), Path(image_root)
        self.source = str(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"COCO Karpathy split file {json_path} does not exist")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
            images = data["images"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{json_path}: not a Karpathy dataset_coco.json ({e!r})") from None
        wanted = self.SPLITS[split]
        for i, entry in enumerate(images):
            if not isinstance(entry, dict):
                self._skip("bad_line", f"{json_path}:images[{i}]", "not a JSON object")
                continue
            if entry.get("split") not in wanted:
                continue
            filename = entry.get("filename")
            key = str(entry.get("cocoid", filename))
            if not isinstance(filename, str) or not filename:
                self._skip("missing_image", f"{json_path}:{key}", "record has no filename")
                continue
            raw = [s.get("raw") if isinstance(s, dict) else None for s in entry.get("sentences", [])]
            captions, dropped = _clean(raw)
            if not captions:
                self._skip("empty_caption", f"{json_path}:{key}", "no non-empty caption")
                continue
            if dropped:
                self.skipped["dropped_captions"] += dropped
            path = self.image_root / entry["filepath"] / filename if entry.get("filepath") else self.image_root / filename
            self.records.append((key, path, captions, key))


class ConceptualCaptionsDataset(_FileCaptionDataset):
    """A TSV of ``caption<TAB>image path`` lines, paths relative to ``image_root`` (Conceptual
    Captions once its images are on disk). Undecodable lines (not UTF-8), lines without exactly
    two fields, and empty captions are skipped and counted. ``header=True`` skips the first line.

    The file CC3M is distributed as names its images by URL: that is refused with a
    ``ValueError`` saying how to download them (img2dataset) and read the download
    (:func:`img2dataset_corpus`, ``lverse encode --data cc --path FOLDER``).
    """

    def __init__(
        self,
        tsv_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        resolution: int = 256,
        train: bool = False,
        load_images: bool = True,
        seed: int = 0,
        header: bool = False,
        crops: int = 1,
    ) -> None:
        super().__init__(resolution, train, load_images, seed, crops=crops)
        tsv_path, self.image_root = Path(tsv_path), Path(image_root)
        self.source = str(tsv_path)
        if not tsv_path.is_file():
            raise FileNotFoundError(f"caption TSV {tsv_path} does not exist")
        lines = tsv_path.read_bytes().split(b"\n")
        for lineno, raw in enumerate(lines[1:] if header else lines, start=2 if header else 1):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            where = f"{tsv_path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._skip("bad_text", where, e)
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[1].strip():
                self._skip("bad_line", where, f"expected 'caption<TAB>path', got {len(fields)} field(s)")
                continue
            caption, rel = clean_caption(fields[0]), fields[1].strip()
            if rel.lower().startswith(URL_PREFIXES):
                raise ValueError(
                    f"{where} names its image by URL ({rel[:60]}): this is the TSV CC3M is distributed as. "
                    f"Download the images first, e.g. `img2dataset --url_list {tsv_path} --input_format tsv "
                    f"--url_col url --caption_col caption --output_format webdataset --output_folder cc3m` (the file "
                    f"has no header: put the line 'caption<TAB>url' first), then `lverse encode --data cc --path cc3m`"
                )
            if not caption:
                self._skip("empty_caption", where, "empty caption")
                continue
            self.records.append((rel, self.image_root / rel, [caption], rel))


class CaptionFolderDataset(_FileCaptionDataset):
    """Images under ``root`` (recursive) with captions in a same-named ``.txt`` beside each
    (``a/b.jpg`` → ``a/b.txt``), one caption per non-empty line. A missing, empty or non-UTF-8
    caption file makes the item a :class:`Skipped`. This is also img2dataset's ``files`` layout,
    whose same-named ``.json`` gives the item's ``id`` (its ``url``)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int = 256,
        train: bool = False,
        load_images: bool = True,
        seed: int = 0,
        crops: int = 1,
    ) -> None:
        super().__init__(resolution, train, load_images, seed, crops=crops)
        self.root = check_dir(root, "caption folder")
        self.source = str(self.root)
        files = list_images(self.root)
        if not files:
            raise FileNotFoundError(f"no images found under {self.root}")
        self.records = [(p.as_posix(), self.root / p, [], p.as_posix()) for p in files]

    def _id(self, index: int) -> str:
        sidecar = self.records[index][1].with_suffix(".json")
        url = _url_of(sidecar.read_bytes()) if sidecar.is_file() else None
        return url or self.records[index][3]

    def _captions(self, index: int) -> list[str] | Skipped:
        txt = self.records[index][1].with_suffix(".txt")
        if not txt.is_file():
            return self._skip("missing_caption", str(txt), "caption file not found")
        try:
            text = txt.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return self._skip("bad_text", str(txt), e)
        captions, _ = _clean(text.splitlines())
        if not captions:
            return self._skip("empty_caption", str(txt), "no non-empty line")
        return captions


class TarCaptionDataset(TarShardDataset):
    """Tar shards with ``key.jpg`` + ``key.txt`` (one caption per line), e.g. img2dataset's
    ``webdataset`` layout, whose ``key.json`` gives the item's ``id`` (its ``url``); see
    :class:`~lverse.data.images.TarShardDataset` for sharding, shuffling and seeding."""

    def __init__(self, *args: Any, crops: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if crops < 1:
            raise ValueError(f"crops must be >= 1, got {crops}")
        self.crops = crops

    def _decode_image(self, key: str, parts: dict[str, bytes], epoch: int) -> torch.Tensor | None | Skipped:
        if self.crops == 1 or not self.load_images:
            return super()._decode_image(key, parts, epoch)
        data = pick_image(parts)
        if data is None:
            return self._skip("missing_image", key, f"no image member among {sorted(parts)}")
        try:  # crops depend on the image alone, not the epoch: encoding twice gives the same codes
            return crop_views(load_image(data), self.transform.resolution, self.crops, self.seed, key,
                              scale=self.transform.scale)
        except Exception as e:
            return self._skip("bad_image", key, e)

    def make_item(self, key: str, parts: dict[str, bytes], epoch: int) -> dict[str, Any] | Skipped:
        if "txt" not in parts:
            return self._skip("missing_caption", key, "no .txt member")
        try:
            text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            return self._skip("bad_text", key, e)
        captions, _ = _clean(text.splitlines())
        if not captions:
            return self._skip("empty_caption", key, "empty .txt")
        image = self._decode_image(key, parts, epoch)
        if isinstance(image, Skipped):
            return image
        return {"image": image, "captions": captions, "key": key, "id": _url_of(parts.get("json")) or key}


def img2dataset_corpus(root: str | os.PathLike[str], **kwargs: Any) -> Dataset:
    """img2dataset's output folder as a caption corpus: its ``webdataset`` layout (``*.tar``) or
    its ``files`` layout (``00000/000000000.jpg`` + ``.txt`` + ``.json``). Failed downloads are
    not in the folder at all (img2dataset lists them in its ``*_stats.json``)."""
    folder = check_dir(root, "img2dataset output folder")
    if any(folder.glob("*.tar")):
        return TarCaptionDataset(str(folder), train=False, **kwargs)
    return CaptionFolderDataset(folder, **kwargs)


__all__ = [
    "CocoKarpathyDataset",
    "ConceptualCaptionsDataset",
    "CaptionFolderDataset",
    "TarCaptionDataset",
    "clean_caption",
    "img2dataset_corpus",
]

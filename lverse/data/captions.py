"""Image–caption corpora for stage 2 (BiART), all yielding one item format.

Every dataset here yields ``{"image": tensor 3×R×R in [-1,1] or None, "captions": list[str],
"key": str}`` (``image`` is ``None`` when built with ``load_images=False``, e.g. to tokenize
captions only). Bad records follow the convention of :mod:`lverse.data.images`: the item is
``None``, a :class:`~lverse.data.images.BadImageWarning` names it once, and
:func:`~lverse.data.images.collate_skip_none` drops and counts it.

Where a check can be made from text already in memory (COCO JSON, CC TSV) the bad record is
removed when the dataset is built; checks that need a file read (images, caption ``.txt``
files, tar members) happen on access. Both kinds are counted in :meth:`skip_summary`
(reasons: ``empty_caption``, ``bad_text``, ``bad_line``, ``missing_image``, ``bad_image``,
``missing_caption``, ``dropped_captions`` — single empty sentences removed from a record
that still has others).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from lverse.data.images import (
    ImageTransform,
    SkipTracker,
    TarShardDataset,
    access_generator,
    check_dir,
    list_images,
    load_image,
    split_key,
)


def _clean(captions: Sequence[Any]) -> tuple[list[str], int]:
    """Strip captions, drop empty/non-string ones; returns (kept, number dropped)."""
    kept = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    return kept, len(captions) - len(kept)


class _FileCaptionDataset(Dataset, SkipTracker):
    """Map-style base: ``records[i] = (key, image path, captions)``; images loaded on access."""

    def __init__(self, resolution: int, train: bool, load_images: bool, seed: int,
                 scale: tuple[float, float] = (0.75, 1.0)) -> None:
        self.transform = ImageTransform(resolution, train, scale)
        self.load_images, self.seed = load_images, seed
        self.records: list[tuple[str, Path, list[str]]] = []
        self._init_skips()

    def __len__(self) -> int:
        return len(self.records)

    def _captions(self, index: int) -> list[str] | None:
        return self.records[index][2]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, access_seed = split_key(key)
        name, path, _ = self.records[index]
        captions = self._captions(index)
        if captions is None:
            return None
        image = None
        if self.load_images:
            if not path.is_file():
                self._skip("missing_image", str(path), "file not found")
                return None
            try:
                image = self.transform(load_image(path), access_generator(self.seed, index, access_seed))
            except Exception as e:
                self._skip("bad_image", str(path), e)
                return None
        return {"image": image, "captions": captions, "key": name}


class CocoKarpathyDataset(_FileCaptionDataset):
    """MS-COCO with Karpathy's splits (``dataset_coco.json``).

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
    ) -> None:
        super().__init__(resolution, train, load_images, seed)
        if split not in self.SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; valid: {sorted(self.SPLITS)}")
        json_path, self.image_root = Path(json_path), Path(image_root)
        if not json_path.is_file():
            raise FileNotFoundError(f"COCO Karpathy split file {json_path} does not exist")
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
            images = data["images"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{json_path}: not a Karpathy dataset_coco.json ({e!r})") from None
        wanted = self.SPLITS[split]
        for entry in images:
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
            self.records.append((key, path, captions))


class ConceptualCaptionsDataset(_FileCaptionDataset):
    """Conceptual Captions style TSV: ``caption<TAB>image path`` per line, paths relative to
    ``image_root``. Undecodable lines (not UTF-8), lines without two fields, and empty
    captions are skipped and counted. ``header=True`` skips the first line."""

    def __init__(
        self,
        tsv_path: str | os.PathLike[str],
        image_root: str | os.PathLike[str],
        resolution: int = 256,
        train: bool = False,
        load_images: bool = True,
        seed: int = 0,
        header: bool = False,
    ) -> None:
        super().__init__(resolution, train, load_images, seed)
        tsv_path, self.image_root = Path(tsv_path), Path(image_root)
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
            if len(fields) < 2 or not fields[1].strip():
                self._skip("bad_line", where, "expected 'caption<TAB>path'")
                continue
            caption, rel = fields[0].strip(), fields[1].strip()
            if not caption:
                self._skip("empty_caption", where, "empty caption")
                continue
            self.records.append((rel, self.image_root / rel, [caption]))


class CaptionFolderDataset(_FileCaptionDataset):
    """Images under ``root`` (recursive) with captions in a same-named ``.txt`` beside each
    (``a/b.jpg`` → ``a/b.txt``), one caption per non-empty line. A missing, empty or
    non-UTF-8 caption file makes the item ``None``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int = 256,
        train: bool = False,
        load_images: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(resolution, train, load_images, seed)
        self.root = check_dir(root, "caption folder")
        files = list_images(self.root)
        if not files:
            raise FileNotFoundError(f"no images found under {self.root}")
        self.records = [(p.as_posix(), self.root / p, []) for p in files]

    def _captions(self, index: int) -> list[str] | None:
        txt = self.records[index][1].with_suffix(".txt")
        if not txt.is_file():
            self._skip("missing_caption", str(txt), "caption file not found")
            return None
        try:
            text = txt.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self._skip("bad_text", str(txt), e)
            return None
        captions, _ = _clean(text.splitlines())
        if not captions:
            self._skip("empty_caption", str(txt), "no non-empty line")
            return None
        return captions


class TarCaptionDataset(TarShardDataset):
    """Tar shards with ``key.jpg`` + ``key.txt`` (one caption per line); see
    :class:`~lverse.data.images.TarShardDataset` for sharding, shuffling and seeding."""

    def make_item(self, key: str, parts: dict[str, bytes], epoch: int) -> dict[str, Any] | None:
        if "txt" not in parts:
            self._skip("missing_caption", key, "no .txt member")
            return None
        try:
            text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            self._skip("bad_text", key, e)
            return None
        captions, _ = _clean(text.splitlines())
        if not captions:
            self._skip("empty_caption", key, "empty .txt")
            return None
        image = self._decode_image(key, parts, epoch)
        if image is False:
            return None
        return {"image": image, "captions": captions, "key": key}


__all__ = [
    "CocoKarpathyDataset",
    "ConceptualCaptionsDataset",
    "CaptionFolderDataset",
    "TarCaptionDataset",
]

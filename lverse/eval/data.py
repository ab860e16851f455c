"""What a protocol evaluates on: a split of a caption corpus, item by item, every reference kept.

A split comes from lverse's caption-dataset registry (``coco``: Karpathy's ``dataset_coco.json``
with an image root; ``folder``: images with same-named ``.txt`` captions (img2dataset's files
layout); ``cc``: a TSV of captions and local paths; ``shapes``, registered by the Shapes
package). Items keep their order in the corpus; item ``i`` is the ``i``-th readable record, so
an evaluation of ``n`` items is the first ``n`` and a larger ``n`` extends it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from lverse.data import build_caption_dataset
from lverse.data.images import Skipped, list_images, read_image
from lverse.eval.run import EvalError


@dataclass
class Split:
    """``ids[i]``, ``captions[i]`` (every reference) and :meth:`image` of each evaluated item."""

    kind: str
    spec: dict[str, Any]
    ids: list[str]
    captions: list[list[str]]
    index: list[int]  # the record in the corpus
    images: Dataset | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> torch.Tensor | Skipped:
        """Item ``i``'s image ``(3, R, R)`` in [-1, 1] (centre crop), or a :class:`Skipped`."""
        assert self.images is not None
        item = self.images[self.index[i]]
        if isinstance(item, Skipped):
            return item
        return item["image"]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: str(v) if isinstance(v, Path) else v for k, v in self.spec.items()}}


def open_split(kind: str, spec: dict[str, Any], resolution: int, n: int | None = None) -> Split:
    """The first ``n`` readable items (all when ``n`` is None) of the corpus ``kind`` built with
    ``spec`` (the registry's keyword arguments), images at ``resolution``."""
    try:
        text = build_caption_dataset(kind, resolution=resolution, load_images=False, **spec)
        images = build_caption_dataset(kind, resolution=resolution, load_images=True, **spec)
    except (TypeError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise EvalError(f"cannot open the {kind} data: {e}") from None
    if isinstance(text, IterableDataset):
        raise EvalError(f"evaluation needs a corpus it can index (coco, folder, cc, shapes); {kind!r} is a stream "
                        "(for img2dataset's output use its files layout, --data folder)")
    ids, caps, index = [], [], []
    skipped: dict[str, int] = {}
    for j in range(len(text)):  # type: ignore[arg-type]
        if n is not None and len(ids) >= n:
            break
        rec = text[j]
        if isinstance(rec, Skipped):
            skipped[rec.reason] = skipped.get(rec.reason, 0) + 1
            continue
        ids.append(str(rec["id"]))
        caps.append(list(rec["captions"]))
        index.append(j)
    built = getattr(text, "skip_summary", lambda: {})()
    for k, v in built.items():
        skipped[k] = max(skipped.get(k, 0), v)
    if not ids:
        raise EvalError(f"the {kind} data {spec} holds no usable item")
    return Split(kind, dict(spec), ids, caps, index, images, skipped)


def sample_captions(split: Split, n: int, seed: int) -> list[tuple[int, str]]:
    """``n`` (item, caption) pairs drawn without replacement from every caption of the split
    (L-Verse Table 3: 30,000 captions of COCO val), in a fixed shuffle: the first ``n`` of it,
    so a larger ``n`` extends the draw."""
    pairs = [(i, c) for i, caps in enumerate(split.captions) for c in caps]
    if n > len(pairs):
        raise EvalError(f"--n {n} captions asked for, but the split holds {len(pairs)}")
    random.Random(f"lverse-eval-captions/{seed}").shuffle(pairs)
    return pairs[:n]


def one_reference(split: Split, i: int, seed: int) -> str:
    """One of item ``i``'s references, drawn from ``seed`` (the reconstruction paper's input text)."""
    caps = split.captions[i]
    return caps[random.Random(f"lverse-eval-ref/{seed}/{split.ids[i]}").randrange(len(caps))]


@dataclass
class ImageFolder:
    """The images under a folder (recursive, sorted), read as the paper's Table 4 does: resize
    the shorter side and centre-crop to ``resolution`` with ``resample`` (LANCZOS)."""

    root: Path
    resolution: int
    resample: str = "lanczos"
    n: int | None = None

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise EvalError(f"image folder not found: {self.root}")
        self.files = list_images(self.root)[: self.n]
        if not self.files:
            raise EvalError(f"no images under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> torch.Tensor | Skipped:
        try:
            return read_image(self.root / self.files[i], self.resolution, self.resample)
        except (OSError, ValueError) as e:
            return Skipped("bad_image", f"{self.files[i]}: {e}")


__all__ = ["ImageFolder", "Split", "one_reference", "open_split", "sample_captions"]

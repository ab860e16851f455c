"""Datasets: the procedural Shapes benchmark, image corpora (stage 1), image–caption corpora
(stage 2), and a registry so configs can name a dataset by kind.

>>> ds = build_image_dataset("shapes", split="train", size=100)
>>> cap = build_caption_dataset("coco", json_path="dataset_coco.json", image_root="coco/")
"""
from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from lverse.data.captions import (
    CaptionFolderDataset,
    CocoKarpathyDataset,
    ConceptualCaptionsDataset,
    ShapesCaptionDataset,
    TarCaptionDataset,
)
from lverse.data.images import (
    BadImageWarning,
    ImageFolderDataset,
    ImageTransform,
    TarShardDataset,
    collate_skip_none,
    derive_seed,
    load_image,
    to_rgb,
    write_tar_shards,
)
from lverse.data.shapes import Scene, ShapeObject, ShapesDataset, caption, phrasings, render

IMAGE_DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": ShapesDataset,
    "folder": ImageFolderDataset,
    "tar": TarShardDataset,
}
CAPTION_DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": ShapesCaptionDataset,
    "coco": CocoKarpathyDataset,
    "cc": ConceptualCaptionsDataset,
    "folder": CaptionFolderDataset,
    "tar": TarCaptionDataset,
}


def _build(table: dict[str, Callable[..., Dataset]], what: str, kind: str, kwargs: dict[str, Any]) -> Dataset:
    if kind not in table:
        raise ValueError(f"unknown {what} dataset kind {kind!r}; valid kinds: {', '.join(table)}")
    if kind == "tar" and "root" in kwargs and "urls_or_glob" not in kwargs:
        # Configs name every on-disk source ``root``; for tar it is a shard spec.
        kwargs = dict(kwargs)
        kwargs["urls_or_glob"] = kwargs.pop("root")
    try:
        return table[kind](**kwargs)
    except TypeError as e:  # most likely a misspelt option: say which dataset rejected it
        raise TypeError(f"{what} dataset {kind!r} ({table[kind].__name__}): {e}") from None


def build_image_dataset(kind: str, **kwargs: Any) -> Dataset:
    """Stage-1 image dataset: ``"shapes"`` | ``"folder"`` | ``"tar"``; kwargs go to its class."""
    return _build(IMAGE_DATASETS, "image", kind, kwargs)


def build_caption_dataset(kind: str, **kwargs: Any) -> Dataset:
    """Stage-2 caption dataset: ``"shapes"`` | ``"coco"`` | ``"cc"`` | ``"folder"`` | ``"tar"``."""
    return _build(CAPTION_DATASETS, "caption", kind, kwargs)


__all__ = [
    "BadImageWarning", "CAPTION_DATASETS", "CaptionFolderDataset", "CocoKarpathyDataset",
    "ConceptualCaptionsDataset", "IMAGE_DATASETS", "ImageFolderDataset", "ImageTransform",
    "Scene", "ShapeObject", "ShapesCaptionDataset", "ShapesDataset",
    "TarCaptionDataset", "TarShardDataset", "build_caption_dataset", "build_image_dataset",
    "caption", "collate_skip_none", "derive_seed", "load_image", "phrasings", "render",
    "to_rgb", "write_tar_shards",
]

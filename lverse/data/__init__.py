"""Datasets: image corpora (stage 1) and image–caption corpora (stage 2), and a registry so
configs can name a dataset by kind.

>>> ds = build_image_dataset("folder", root="imagenet/train", resolution=256)
>>> cap = build_caption_dataset("coco", json_path="dataset_coco.json", image_root="coco/")

Other packages add kinds with :func:`register_image_dataset` / :func:`register_caption_dataset`
(importing the Shapes package registers ``"shapes"``), so this package never imports them.
"""
from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

from lverse.data.captions import (
    CaptionFolderDataset,
    CocoKarpathyDataset,
    ConceptualCaptionsDataset,
    TarCaptionDataset,
    img2dataset_corpus,
)
from lverse.data.images import (
    BadImageWarning,
    ImageFolderDataset,
    ImageTransform,
    TarShardDataset,
    collate_skip_none,
    derive_seed,
    load_image,
    read_image,
    to_rgb,
    write_tar_shards,
)

IMAGE_DATASETS: dict[str, Callable[..., Dataset]] = {
    "folder": ImageFolderDataset,
    "tar": TarShardDataset,
}
CAPTION_DATASETS: dict[str, Callable[..., Dataset]] = {
    "coco": CocoKarpathyDataset,
    "cc": ConceptualCaptionsDataset,
    "folder": CaptionFolderDataset,
    "tar": TarCaptionDataset,
}


def register_image_dataset(kind: str, factory: Callable[..., Dataset]) -> None:
    """Make ``build_image_dataset(kind, ...)`` (and ``data.kind: KIND`` in configs) build ``factory``."""
    IMAGE_DATASETS[kind] = factory


def register_caption_dataset(kind: str, factory: Callable[..., Dataset]) -> None:
    """Make ``build_caption_dataset(kind, ...)`` build ``factory``."""
    CAPTION_DATASETS[kind] = factory


def _build(table: dict[str, Callable[..., Dataset]], what: str, kind: str, kwargs: dict[str, Any]) -> Dataset:
    if kind not in table:
        hint = " (importing the Shapes package registers it)" if kind == "shapes" else ""
        raise ValueError(f"unknown {what} dataset kind {kind!r}{hint}; valid kinds: {', '.join(table)}")
    if kind == "tar" and "root" in kwargs and "urls_or_glob" not in kwargs:
        # Configs name every on-disk source ``root``; for tar it is a shard spec.
        kwargs = dict(kwargs)
        kwargs["urls_or_glob"] = kwargs.pop("root")
    try:
        return table[kind](**kwargs)
    except TypeError as e:  # most likely a misspelt option: say which dataset rejected it
        raise TypeError(f"{what} dataset {kind!r} ({table[kind].__name__}): {e}") from None


def build_image_dataset(kind: str, **kwargs: Any) -> Dataset:
    """Stage-1 image dataset: ``"folder"`` | ``"tar"`` (| ``"shapes"``); kwargs go to its class."""
    return _build(IMAGE_DATASETS, "image", kind, kwargs)


def build_caption_dataset(kind: str, **kwargs: Any) -> Dataset:
    """Stage-2 caption dataset: ``"coco"`` | ``"cc"`` | ``"folder"`` | ``"tar"`` (| ``"shapes"``)."""
    return _build(CAPTION_DATASETS, "caption", kind, kwargs)


__all__ = [
    "BadImageWarning", "CAPTION_DATASETS", "CaptionFolderDataset", "CocoKarpathyDataset",
    "ConceptualCaptionsDataset", "IMAGE_DATASETS", "ImageFolderDataset", "ImageTransform",
    "TarCaptionDataset", "TarShardDataset", "build_caption_dataset", "build_image_dataset", "img2dataset_corpus",
    "collate_skip_none", "derive_seed", "load_image", "read_image", "register_caption_dataset",
    "register_image_dataset", "to_rgb", "write_tar_shards",
]

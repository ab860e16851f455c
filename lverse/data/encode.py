"""Encoding: run the AugVAE-SL once over an image–caption corpus and write token shards.

The autoencoder runs in fp32 (the paper's reason: fp16 underflows in the quantizer) under
``torch.no_grad``; BiART training then reads the shards without any autoencoder in its loop.
Under ``torchrun`` each rank encodes every world_size-th item and writes its own shards; rank 0
merges the shard lists into one ``meta.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from lverse.data import build_caption_dataset
from lverse.data.images import collate_skip_none
from lverse.data.tokens import TokenShardWriter
from lverse.dist import barrier
from lverse.files import atomic_write_text
from lverse.models.augvae import AugVAE


@torch.no_grad()
def encode_corpus(
    augvae: AugVAE,
    dataset: Any,
    out_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    shard_size: int = 50000,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode ``dataset`` (items ``{"image", "captions"}``) into token shards in ``out_dir``."""
    augvae = augvae.to(device).float().eval()
    if isinstance(dataset, IterableDataset):
        data = dataset  # streams shard themselves over ranks
    else:
        data = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none)
    writer = TokenShardWriter(out_dir, augvae.tokens_per_image, augvae.cfg.codebook_size, shard_size,
                              prefix=f"r{rank}_" if world_size > 1 else "")
    skipped = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data) if hasattr(data, "__len__") else None, desc="encode", unit="img", dynamic_ncols=True)
    for batch in loader:
        skipped += batch["skipped"]
        if batch["batch_size"]:
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                codes = augvae.encode(batch["image"].to(device).float())
            writer.add(codes, batch["captions"])
        if bar is not None:
            bar.update(batch["batch_size"] + batch["skipped"])
    if bar is not None:
        bar.close()
    meta = writer.close({"skipped": skipped, **(extra_meta or {})}, write_meta=world_size == 1)
    if world_size > 1:
        atomic_write_text(Path(out_dir) / f"meta_r{rank}.json", json.dumps(meta))
        barrier()
        if rank == 0:
            parts = [json.loads((Path(out_dir) / f"meta_r{r}.json").read_text()) for r in range(world_size)]
            meta = {**parts[0], "shards": [s for p in parts for s in p["shards"]],
                    "num_items": sum(p["num_items"] for p in parts), "skipped": sum(p["skipped"] for p in parts)}
            atomic_write_text(Path(out_dir) / "meta.json", json.dumps(meta, indent=2))
        barrier()
    return meta


DATA_KINDS = ("shapes", "coco", "cc", "folder", "tar")


def build_corpus(kind: str, path: str, image_root: str, split: str, resolution: int, size: int, seed: int) -> Any:
    if kind == "shapes":
        return build_caption_dataset("shapes", split=split, size=size, seed=seed, resolution=resolution)
    if kind == "coco":
        return build_caption_dataset("coco", json_path=path, image_root=image_root, split=split, resolution=resolution)
    if kind == "cc":
        return build_caption_dataset("cc", tsv_path=path, image_root=image_root, resolution=resolution)
    if kind in ("folder", "tar"):
        return build_caption_dataset(kind, root=path, resolution=resolution)
    raise ValueError(f"unknown data kind {kind!r}; valid: {DATA_KINDS}")

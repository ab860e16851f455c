"""`lverse encode`: run the AugVAE-SL once over an image–caption corpus and write token shards.

The autoencoder runs in fp32 (the paper's reason: fp16 underflows in the quantizer) under
``torch.no_grad``; BiART training then reads the shards without any autoencoder in its loop.
Under ``torchrun`` each rank encodes every world_size-th item and writes its own shards; rank 0
merges the shard lists into one ``meta.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from .data import build_caption_dataset
from .data.tokens import TokenShardWriter
from .io import atomic_write_text
from .models.augvae import AugVAE
from .train.dist import barrier, cleanup, init_distributed


def _collate(items: list[Any]) -> dict[str, Any]:
    good = [it for it in items if it is not None and it.get("image") is not None and it.get("captions")]
    return {
        "image": torch.stack([it["image"] for it in good]) if good else torch.empty(0),
        "captions": [it["captions"] for it in good],
        "skipped": len(items) - len(good),
    }


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
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    writer = TokenShardWriter(out_dir, augvae.tokens_per_image, augvae.cfg.codebook_size, shard_size,
                              prefix=f"r{rank}_" if world_size > 1 else "")
    skipped = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data) if hasattr(data, "__len__") else None, desc="encode", unit="img", dynamic_ncols=True)
    for batch in loader:
        skipped += batch["skipped"]
        if batch["image"].numel():
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                codes = augvae.encode(batch["image"].to(device).float())
            writer.add(codes, batch["captions"])
        if bar is not None:
            bar.update(len(batch["captions"]) + batch["skipped"])
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lverse encode", description=__doc__.splitlines()[0])
    ap.add_argument("--augvae", required=True, help="AugVAE-SL weights (.safetensors) or a stage-1 run directory")
    ap.add_argument("--data", choices=DATA_KINDS, default="shapes")
    ap.add_argument("--path", default="", help="COCO Karpathy JSON, CC TSV, caption folder, or tar-shard glob")
    ap.add_argument("--image-root", default="", help="image root for COCO / CC")
    ap.add_argument("--split", default="train", help="COCO: train|val|test (train includes restval); Shapes: train|test")
    ap.add_argument("--size", type=int, default=20000, help="Shapes: number of scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output token directory")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        from .train.stage1 import resolve_weights

        info = init_distributed(args.device)
        augvae = AugVAE.load(resolve_weights(args.augvae))
        if augvae.cfg.variant != "sl":
            raise ValueError(f"{args.augvae}: BiART is trained on AugVAE-SL tokens; this is an AugVAE-{augvae.cfg.variant.upper()}")
        corpus = build_corpus(args.data, args.path, args.image_root, args.split, augvae.cfg.resolution, args.size, args.seed)
        meta = encode_corpus(
            augvae, corpus, args.out, args.batch_size, args.num_workers, info.device, args.shard_size,
            info.rank, info.world_size,
            extra_meta={"augvae": str(args.augvae), "data": args.data, "path": args.path, "split": args.split,
                        "seed": args.seed},
        )
        if info.is_main:
            print(json.dumps({k: meta[k] for k in ("num_items", "tokens_per_image", "skipped")}))
        cleanup()  # under torchrun: leave the process group together (barrier, then destroy)
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

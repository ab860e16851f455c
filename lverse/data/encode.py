"""Encoding: run the AugVAE-SL once over an image–caption corpus and write token shards.

The autoencoder runs in fp32 (the paper's reason: fp16 underflows in the quantizer) under
``torch.no_grad``; BiART training then reads the shards without any autoencoder in its loop.
Under ``torchrun`` each rank encodes every world_size-th item and writes its own shards; rank 0
merges the shard lists and the counts into one ``meta.json``.

``meta.json`` accounts for every record: ``num_items`` encoded, ``skipped`` dropped with
``skipped_by`` (reason -> count: dropped when the corpus was read, e.g. a COCO entry without
captions, or when the record was loaded, e.g. a corrupt image), ``records`` (both), ``bad_share``
(skipped / records), ``dropped_captions`` (empty sentences removed from records that kept
others), ``duplicate_ids`` (rows whose id was already written, with a few examples) and
``seconds``. ``crops`` > 1 stores several crops of each image (:func:`lverse.data.images.crop_views`).
"""
from __future__ import annotations

import array
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from lverse.data import build_caption_dataset, img2dataset_corpus
from lverse.data.images import collate_skip_none, derive_seed
from lverse.data.tokens import TokenShardWriter, read_rows
from lverse.dist import barrier
from lverse.files import atomic_write_text
from lverse.models.augvae import AugVAE

DATA_KINDS = ("shapes", "coco", "cc", "folder", "tar")
# A record dropped in this way is not a bad record (the record itself is kept).
NOT_RECORDS = ("dropped_captions",)


def build_corpus(kind: str, path: str, image_root: str, split: str, resolution: int, size: int, seed: int,
                 crops: int = 1) -> Any:
    """The caption dataset ``lverse encode --data KIND`` reads. ``cc``: a folder is img2dataset's
    output (the usual way to get CC3M), a file a TSV of ``caption<TAB>local path``."""
    common = dict(resolution=resolution, crops=crops)
    if kind == "shapes":
        return build_caption_dataset("shapes", split=split, size=size, seed=seed, **common)
    if kind == "coco":
        return build_caption_dataset("coco", json_path=path, image_root=image_root, split=split, **common)
    if kind == "cc":
        if Path(path).is_dir():
            return img2dataset_corpus(path, **common)
        return build_caption_dataset("cc", tsv_path=path, image_root=image_root, **common)
    if kind in ("folder", "tar"):
        return build_caption_dataset(kind, root=path, **common)
    raise ValueError(f"unknown data kind {kind!r}; valid: {DATA_KINDS}")


def _build_time_skips(dataset: Any) -> Counter[str]:
    """What the dataset dropped while it was built (read before any item is loaded)."""
    return Counter(getattr(dataset, "skip_summary", dict)())


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
    """Encode ``dataset`` (items ``{"image", "captions", "id"}``; ``image`` (crops, 3, R, R) for
    several crops) into token shards in ``out_dir``; returns the ``meta.json`` content."""
    t0 = time.time()
    augvae = augvae.to(device).float().eval()
    built = _build_time_skips(dataset) if rank == 0 else Counter()
    crops = int(getattr(dataset, "crops", 1))
    if isinstance(dataset, IterableDataset):
        data = dataset  # streams shard themselves over ranks
    else:
        data = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none)
    writer = TokenShardWriter(out_dir, augvae.tokens_per_image, augvae.cfg.codebook_size, shard_size,
                              prefix=f"r{rank}_" if world_size > 1 else "", crops=crops)
    loaded: Counter[str] = Counter()
    id_hashes = array.array("q")
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data) if hasattr(data, "__len__") else None, desc="encode", unit="img", dynamic_ncols=True)
    for batch in loader:
        loaded.update(batch.get("skipped_by", {}))
        if batch["batch_size"]:
            images = batch["image"].to(device).float()
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                codes = augvae.encode(images.flatten(0, 1) if crops > 1 else images)
            ids = batch.get("id") or batch.get("key")
            writer.add(codes.view(len(images), crops, -1) if crops > 1 else codes, batch["captions"], ids)
            id_hashes.extend(derive_seed("lverse-id", i) for i in ids or [])
        if bar is not None:
            bar.update(batch["batch_size"] + batch["skipped"])
    if bar is not None:
        bar.close()
    skipped_by = built + loaded
    for k in NOT_RECORDS:
        skipped_by.pop(k, None)
    meta = writer.close({"skipped_by": dict(skipped_by), "dropped_captions": built.get("dropped_captions", 0),
                         **(extra_meta or {})}, write_meta=False)
    out = Path(out_dir)
    if world_size > 1:
        np.save(out / f"ids_r{rank}.npy", np.frombuffer(id_hashes, dtype=np.int64))
        atomic_write_text(out / f"meta_r{rank}.json", json.dumps(meta))
        barrier()
        if rank == 0:
            parts = [json.loads((out / f"meta_r{r}.json").read_text()) for r in range(world_size)]
            by: Counter[str] = Counter()
            for part in parts:
                by.update(part["skipped_by"])
            meta = {**parts[0], "shards": [s for part in parts for s in part["shards"]],
                    "num_items": sum(part["num_items"] for part in parts), "skipped_by": dict(by)}
            hashes = np.concatenate([np.load(out / f"ids_r{r}.npy") for r in range(world_size)])
            _finish_meta(meta, out, hashes, time.time() - t0)
            for r in range(world_size):
                (out / f"meta_r{r}.json").unlink()
                (out / f"ids_r{r}.npy").unlink()
        barrier()
    else:
        _finish_meta(meta, out, np.frombuffer(id_hashes, dtype=np.int64), time.time() - t0)
    return meta if rank == 0 else {**meta, "rank": rank}


def _finish_meta(meta: dict[str, Any], out: Path, id_hashes: np.ndarray, seconds: float) -> None:
    """Totals, the bad share and duplicate ids (with up to five examples); writes meta.json."""
    meta["skipped_by"] = dict(sorted(meta["skipped_by"].items()))
    meta["skipped"] = sum(meta["skipped_by"].values())
    meta["records"] = meta["num_items"] + meta["skipped"]
    meta["bad_share"] = meta["skipped"] / meta["records"] if meta["records"] else 0.0
    uniq, counts = np.unique(id_hashes, return_counts=True)
    repeated = set(uniq[counts > 1].tolist())
    meta["duplicate_ids"] = int(counts[counts > 1].sum() - len(repeated))
    examples: list[str] = []
    if repeated:  # name a few: the ids are in the rows just written
        for shard in meta["shards"]:
            for row in read_rows(out / shard["captions"]):
                if row["id"] is not None and derive_seed("lverse-id", row["id"]) in repeated and row["id"] not in examples:
                    examples.append(row["id"])
                if len(examples) == 5:
                    break
            if len(examples) == 5:
                break
    meta["duplicate_examples"] = examples
    meta["seconds"] = round(seconds, 1)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))

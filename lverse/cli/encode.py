"""``lverse encode``: AugVAE-SL → token shards for BiART (:mod:`lverse.data.encode`)."""
from __future__ import annotations

import argparse
import json
import sys

from lverse.data.encode import DATA_KINDS, build_corpus, encode_corpus
from lverse.dist import cleanup, init_distributed
from lverse.files import resolve_weights
from lverse.models.augvae import AugVAE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lverse encode", description="Run the AugVAE-SL once over an image–caption corpus and write token shards for BiART.")
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
        import lverse.shapes  # noqa: F401  (registers --data shapes)

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

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
    ap = argparse.ArgumentParser(prog="lverse encode", description="Run the AugVAE-SL once over an image–caption "
                                 "corpus and write token shards for BiART. Exits non-zero when it encodes nothing or "
                                 "when more than --max-bad-share of the records are bad (the shards are kept).")
    ap.add_argument("--augvae", required=True, help="AugVAE-SL weights (.safetensors) or a stage-1 run directory")
    ap.add_argument("--data", choices=DATA_KINDS, default="shapes")
    ap.add_argument("--path", default="", help="COCO Karpathy JSON; CC: img2dataset's output folder (webdataset or "
                    "files layout) or a TSV of caption<TAB>local path; a caption folder; or a tar-shard glob")
    ap.add_argument("--image-root", default="", help="image root for COCO / a CC TSV of local paths")
    ap.add_argument("--split", default="train", help="COCO: train|val|test (train includes restval); Shapes: train|test")
    ap.add_argument("--size", type=int, default=20000, help="Shapes: number of scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crops", type=int, default=1,
                    help="crops kept per image: the centre crop, then random resized crops (scale 0.75-1, the paper's "
                         "augmentation); BiART training draws one per item per epoch (default 1)")
    ap.add_argument("--max-bad-share", type=float, default=0.05,
                    help="fail when more than this share of the records is bad (default 0.05)")
    ap.add_argument("--out", required=True, help="output token directory")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        import lverse.shapes  # noqa: F401  (registers --data shapes)

        if args.crops < 1:
            raise ValueError(f"--crops must be >= 1, got {args.crops}")
        if not 0 <= args.max_bad_share <= 1:
            raise ValueError(f"--max-bad-share must be in [0, 1], got {args.max_bad_share}")
        info = init_distributed(args.device)
        augvae = AugVAE.load(resolve_weights(args.augvae))
        if augvae.cfg.variant != "sl":
            raise ValueError(f"{args.augvae}: BiART is trained on AugVAE-SL tokens; this is an AugVAE-{augvae.cfg.variant.upper()}")
        corpus = build_corpus(args.data, args.path, args.image_root, args.split, augvae.cfg.resolution, args.size,
                              args.seed, args.crops)
        meta = encode_corpus(
            augvae, corpus, args.out, args.batch_size, args.num_workers, info.device, args.shard_size,
            info.rank, info.world_size,
            extra_meta={"augvae": str(args.augvae), "data": args.data, "path": args.path, "split": args.split,
                        "seed": args.seed},
        )
        cleanup()  # under torchrun: leave the process group together (barrier, then destroy)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not info.is_main:
        return 0
    keys = ("num_items", "tokens_per_image", "crops", "records", "skipped", "skipped_by", "dropped_captions",
            "bad_share", "duplicate_ids", "seconds")
    print(json.dumps({k: meta[k] for k in keys}))
    if meta["duplicate_ids"]:
        print(f"warning: {meta['duplicate_ids']} row(s) repeat an id already written, e.g. "
              f"{meta['duplicate_examples'][:3]}", file=sys.stderr)
    by = ", ".join(f"{k} {n}" for k, n in meta["skipped_by"].items()) or "none"
    if meta["num_items"] == 0:
        print(f"error: {args.out}: encoded nothing: {meta['records']} record(s), all skipped ({by})", file=sys.stderr)
        return 2
    if meta["bad_share"] > args.max_bad_share:
        print(f"error: {args.out}: {meta['skipped']} of {meta['records']} records were bad ({meta['bad_share']:.1%} > "
              f"--max-bad-share {args.max_bad_share:g}: {by}); the {meta['num_items']} good ones are written",
              file=sys.stderr)
        return 2
    return 0

"""Does a Shapes BiART overfit its training scenes? NLL on scenes it saw against scenes it did not.

Shapes scenes are procedural: item ``i`` of the train split is the same scene for every
``--size``, so the scenes after the ones a token directory holds are fresh scenes of exactly the
training distribution. This scores, teacher-forced with the bundle's BiART, the first ``--n``
items of ``--tokens`` (seen in training) and ``--n`` fresh ones encoded with the bundle's AugVAE
(unseen), in both directions: mean NLL per image code given the caption (text→image) and per
caption token given the image (image→text). A seen/unseen gap says more scenes would help that
direction; no gap says more steps would.

    python bench/biart_fit.py --checkpoint checkpoints/shapes --tokens runs/shapes_tokens --n 1000
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lverse.inference.pipeline import LVersePipeline
from lverse.inference.rerank import conditional_logprob
from lverse.shapes.scenes import ShapesDataset


def nll(pipe: LVersePipeline, captions: list[str], codes: torch.Tensor, batch_size: int) -> dict[str, float]:
    ids, _ = pipe.encode_prompts(captions, warn=False)
    t2i = conditional_logprob(pipe.biart, ids, codes, "t2i", batch_size)
    i2t = conditional_logprob(pipe.biart, codes, pipe.captions_to_ids(captions), "i2t", batch_size)
    return {"text_to_image": -t2i.mean().item(), "image_to_text": -i2t.mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes", help="pipeline directory (AugVAE + BiART)")
    ap.add_argument("--tokens", required=True, help="the Shapes token directory the BiART was trained on")
    ap.add_argument("--n", type=int, default=1000, help="scenes per group")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    tokens = Path(args.tokens)
    meta = json.loads((tokens / "meta.json").read_text())
    if meta.get("data") != "shapes" or meta.get("split", "train") != "train":
        raise SystemExit(f"error: {tokens}: not a Shapes train-split token directory (meta.json: data={meta.get('data')!r}, split={meta.get('split')!r})")
    shard = meta["shards"][0]
    if shard["count"] < args.n:
        raise SystemExit(f"error: {tokens}: the first shard holds {shard['count']} items, fewer than --n {args.n}")
    pipe = LVersePipeline.load(args.checkpoint, device=args.device)
    seen_codes = torch.from_numpy(np.load(tokens / shard["codes"])[: args.n].astype(np.int64))
    with open(tokens / shard["captions"]) as f:
        kept = [json.loads(line) for _, line in zip(range(args.n), f)]
    ds = ShapesDataset("train", size=meta["num_items"] + args.n, seed=int(meta.get("seed", 0)), resolution=pipe.resolution)
    # Both groups take the dataset's own phrasing of each scene, so only having been seen differs.
    seen_caps = [ds[i]["caption"] for i in range(args.n)]
    if any(c not in k for c, k in zip(seen_caps, kept)):
        raise SystemExit(f"error: {tokens}: its captions are not those of Shapes train scenes with seed "
                         f"{meta.get('seed', 0)} (a token directory written with another seed?)")
    fresh = [ds[meta["num_items"] + i] for i in range(args.n)]
    with torch.no_grad():
        unseen_codes = pipe.encode_images(torch.stack([it["image"] for it in fresh]), batch_size=64).cpu()
        rows = {"seen": nll(pipe, seen_caps, seen_codes, args.batch_size),
                "unseen": nll(pipe, [it["caption"] for it in fresh], unseen_codes, args.batch_size)}
    print(f"| {args.n} scenes | text→image NLL / code | image→text NLL / token |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['text_to_image']:.3f} | {r['image_to_text']:.3f} |")
    print(json.dumps({"checkpoint": args.checkpoint, "tokens": str(tokens), "n": args.n, **rows}))


if __name__ == "__main__":
    main()

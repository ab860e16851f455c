"""Compare CLIP rerankers on the very same Shapes candidates.

Drawing the benchmark's candidates is most of its time, and two draws differ by a few points on
their own, which hides a reranker's effect. This draws them once (``run_benchmark`` with
``candidates_out``: candidates, the judge's verdicts and the cycle scores, both directions), keeps
them in ``--cache``, and then only re-scores them with each ``--clip``: two CLIPs then differ only
where their picks differ. With the bundle's own CLIP on the benchmark's seed and size it prints the
report's figures. Use a dev seed (not the benchmark's 0) to choose, and the benchmark to confirm.

    python bench/rerank_compare.py --checkpoint checkpoints/shapes --seed 7 --n 300 \\
        --cache runs/rerank_cache_s7.pt --clip checkpoints/shapes/clip.safetensors --clip runs/other_clip

The cache is a torch file (about 0.5 GB for 300 items x 64 candidates: images are kept in fp16).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lverse.inference.pipeline import LVersePipeline, resolve_device
from lverse.inference.rerank import ClipReranker
from lverse.shapes.benchmark import CANDIDATES, DIRECTIONS, parse_directions, rescore_candidates, run_benchmark


def build_cache(args: argparse.Namespace, directions: list[str]) -> dict:
    pipe = LVersePipeline.load(args.checkpoint, device=args.device)
    cands: dict = {}
    run_benchmark(pipe, args.n, args.candidates, args.seed, ("none", "cycle"), args.batch_size,
                  directions=directions, candidates_out=cands)
    for c in cands.get("text_to_image", []):
        c["candidates"] = c["candidates"].half()
    cands["meta"] = {"checkpoint": str(args.checkpoint), "n": args.n, "seed": args.seed, "candidates": args.candidates}
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    torch.save(cands, args.cache)
    print(f"[rerank_compare] kept the candidates in {args.cache}", file=sys.stderr)
    return cands


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/shapes", help="the bundle that draws the candidates")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7, help="test-split seed (default 7: a dev set, not the benchmark's 0)")
    ap.add_argument("--candidates", type=int, default=CANDIDATES)
    ap.add_argument("--directions", default=",".join(DIRECTIONS))
    ap.add_argument("--cache", required=True, help="candidates file: read if it exists, else written")
    ap.add_argument("--clip", action="append", default=[], help="a clip.safetensors or a directory holding one (repeatable)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    directions = parse_directions(args.directions)
    if directions is None:
        return 2
    if Path(args.cache).is_file():
        cands = torch.load(args.cache, weights_only=False)
        want = {"checkpoint": str(args.checkpoint), "n": args.n, "seed": args.seed, "candidates": args.candidates}
        got = {k: cands["meta"][k] for k in want}
        if got != want:
            print(f"error: {args.cache} holds {got}, not {want}: pass those, or another --cache", file=sys.stderr)
            return 2
    else:
        cands = build_cache(args, directions)
    rows = []
    for path in args.clip or [str(Path(args.checkpoint) / "clip.safetensors")]:
        clip = ClipReranker(path, resolve_device(args.device))
        res = rescore_candidates(cands, clip)
        for d, s in res.items():
            rows.append({"model": path, "direction": d, **{r: s[r]["exact"] for r in ("none", "clip", "cycle", "clip+cycle")},
                         "clip+cycle_two_objects": s["clip+cycle"].get("exact_by_objects", {}).get("2"),
                         "pairwise_auc_clip": s["pairwise_auc_clip"], "oracle": s["oracle_any_correct"]})
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"{cands['meta']['n']} items, seed {cands['meta']['seed']}, {cands['meta']['candidates']} candidates "
          f"from {cands['meta']['checkpoint']}\n")
    print("| CLIP | task | clip | clip+cycle | clip+cycle, two objects | pairwise AUC clip | cycle | oracle |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['direction']} | {pct(r['clip'])} | {pct(r['clip+cycle'])} | "
              f"{pct(r['clip+cycle_two_objects'])} | {pct(r['pairwise_auc_clip'])} | {pct(r['cycle'])} | {pct(r['oracle'])} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Shapes world's commands: ``lverse demo``, ``lverse benchmark``, ``lverse train-clip``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def demo(argv: list[str] | None = None) -> int:
    from lverse.inference.pipeline import default_checkpoint_dir
    from lverse.shapes.demo import sample_both_directions, train_autoencoder

    ap = argparse.ArgumentParser(prog="lverse demo", description="The README's main job: sample both directions "
                                 "with the shipped Shapes checkpoints on the CPU and judge them.")
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--train", action="store_true", help="train the tiny autoencoder instead of sampling")
    ap.add_argument("--steps", type=int, default=300, help="--train: optimisation steps")
    ap.add_argument("--checkpoint", default=None, help="pipeline directory (default: checkpoints/shapes)")
    ap.add_argument("--n", type=int, default=8, help="test captions and images to sample")
    ap.add_argument("--candidates", type=int, default=None,
                    help="candidates per item (default: the sampling default, 64, as sample.py)")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint_dir()
    if args.train or not (ckpt / "biart.safetensors").is_file():
        if not args.train:
            print(f"[demo] no shipped pipeline in {ckpt}: training the autoencoder instead", file=sys.stderr)
        return train_autoencoder(Path(args.out) / "augvae", args.steps)
    try:
        return sample_both_directions(args.checkpoint, Path(args.out), args.n, args.candidates)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def benchmark(argv: list[str] | None = None) -> int:
    from lverse.inference.pipeline import LVersePipeline
    from lverse.inference.rerank import check_reranker
    from lverse.shapes.benchmark import (
        CANDIDATES,
        DIRECTIONS,
        RERANKERS,
        markdown_table,
        parse_directions,
        run_benchmark,
        update_model_card,
    )

    ap = argparse.ArgumentParser(prog="lverse benchmark",
                                 description="Shapes benchmark: reconstruction, image→text, text→image with rerankers.")
    ap.add_argument("--checkpoint", default=None, help="pipeline directory (default: the shipped checkpoints/shapes)")
    ap.add_argument("--n", type=int, default=500, help="test scenes")
    ap.add_argument("--candidates", type=int, default=CANDIDATES,
                    help=f"candidates per item (default {CANDIDATES}: the paper's number for both directions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerankers", default=",".join(RERANKERS),
                    help="comma list; besides the default: likelihood, reconstruct[:clip|latent|tokens|sbert] "
                         "and '+' combinations, e.g. reconstruct:clip,clip+reconstruct:latent")
    ap.add_argument("--reconstruct-samples", type=int, default=1,
                    help="reconstructions per candidate for the reconstruct rerankers (default 1, the paper's)")
    ap.add_argument("--directions", default=",".join(DIRECTIONS),
                    help="comma-separated subset of image_to_text,text_to_image (default both; "
                         "reconstruction is always measured)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale for text->image (default: the bundle's sampling.json, else 1 = off)")
    ap.add_argument("--image-temperature", type=float, default=None,
                    help="sampling temperature for text->image (default: the bundle's sampling.json, else 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/shapes_eval", help="writes report.json and report.md here")
    args = ap.parse_args(argv)
    directions = parse_directions(args.directions)
    if directions is None:
        return 2
    try:
        for r in args.rerankers.split(","):
            check_reranker(r)
        pipe = LVersePipeline.load(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(pipe, args.n, args.candidates, args.seed, args.rerankers.split(","), args.batch_size,
                               t2i_guidance=args.guidance, t2i_temperature=args.image_temperature,
                               directions=directions, reconstruct_samples=args.reconstruct_samples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "report.md").write_text(table)
    card = out / "README.md"
    if card.is_file() and len(directions) < len(DIRECTIONS):
        print(f"[bench] left the model card {card} alone: a report of {','.join(directions)} only", file=sys.stderr)
    elif card.is_file() and update_model_card(card, table):
        print(f"[bench] updated the benchmark section of the model card {card}", file=sys.stderr)
    print(table)
    return 0


def train_clip(argv: list[str] | None = None) -> int:
    from lverse.cli.train import resolve_resume_dir
    from lverse.config import ConfigError, load_config
    from lverse.dist import cleanup, leave
    from lverse.shapes.clip_train import ClipTrainConfig
    from lverse.shapes.clip_train import train_clip as run

    ap = argparse.ArgumentParser(prog="lverse train-clip",
                                 description="Train a tiny open_clip CLIP on Shapes (for the CLIP reranker).")
    ap.add_argument("--config", help="YAML recipe, e.g. configs/shapes_clip.yaml (defaults when omitted)")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                    help="continue from the latest checkpoint of RUN_DIR (default: the config's run_dir)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 model.text_layers=2")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after --config
    try:
        cfg = load_config(ClipTrainConfig, args.config, args.overrides)
        resume = resolve_resume_dir(args.resume, cfg.train) if args.resume is not None else None
        result = run(cfg, resume=resume)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return leave(2)
    if not result.stopped:
        cleanup()  # under torchrun: leave the process group together (see lverse.cli.train)
    if result.model is not None:  # rank 0 of a finished run
        print(json.dumps({"run_dir": str(result.run_dir), **result.metrics}, indent=2))
    return leave(0)

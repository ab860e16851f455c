"""The README's main job: a CPU demo on the built-in Shapes data.

With the shipped Shapes checkpoints (``checkpoints/shapes/``) it samples both directions and
judges them; without them (or with ``--train``) it trains the tiny Shapes AugVAE-ML for a few
minutes and writes a reconstruction grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config


def train_autoencoder(out: Path, steps: int) -> int:
    from .train.stage1 import Stage1Config
    from .train.stage1 import main as stage1_main

    config = Path(__file__).resolve().parent.parent / "configs" / "shapes_augvae_ml.yaml"
    cfg = load_config(Stage1Config, config)  # fail early on a broken config
    del cfg
    print(f"[demo] training the tiny Shapes AugVAE-ML for {steps} steps on the CPU -> {out}", file=sys.stderr)
    rc = stage1_main(["--config", str(config), f"train.run_dir={out}", f"train.max_steps={steps}",
                      f"train.image_every={steps}", f"train.ckpt_every={steps}", "train.device=cpu"])
    if rc == 0:
        grids = sorted((out / "images").glob("reconstruction_*.png"))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"reconstruction_grid": str(grids[-1]) if grids else None,
                          "mse_first": metrics[0]["mse"], "mse_last": metrics[-1]["mse"],
                          "codebook_perplexity": metrics[-1].get("codebook/perplexity")}, indent=2))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lverse.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--train", action="store_true", help="train the tiny autoencoder instead of sampling")
    ap.add_argument("--steps", type=int, default=300, help="--train: optimisation steps")
    args = ap.parse_args(argv)
    return train_autoencoder(Path(args.out) / "augvae", args.steps)


if __name__ == "__main__":
    sys.exit(main())

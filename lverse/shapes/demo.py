"""The README's main job: a CPU demo on the built-in Shapes data.

With the shipped Shapes checkpoints (``checkpoints/shapes/``) it samples both directions and
judges them; without them (or with ``--train``) it trains the tiny Shapes AugVAE-ML for a few
minutes and writes a reconstruction grid.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lverse.config import load_config


def train_autoencoder(out: Path, steps: int) -> int:
    from lverse.train.loop import Trainer
    from lverse.train.stage1 import Stage1Config, Stage1Task

    config = Path(__file__).resolve().parents[2] / "configs" / "shapes_augvae_ml.yaml"
    cfg = load_config(Stage1Config, config, [f"train.run_dir={out}", f"train.max_steps={steps}",
                                             f"train.image_every={steps}", f"train.ckpt_every={steps}",
                                             "train.device=cpu"])
    print(f"[demo] training the tiny Shapes AugVAE-ML for {steps} steps on the CPU -> {out}", file=sys.stderr)
    trainer = Trainer(cfg.train, lambda: Stage1Task(cfg), full_config=cfg)
    if trainer.fit()["stopped"]:
        return 130
    trainer.export()
    grids = sorted((out / "images").glob("reconstruction_*.png"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"reconstruction_grid": str(grids[-1]) if grids else None,
                      "mse_first": metrics[0]["mse"], "mse_last": metrics[-1]["mse"],
                      "codebook_perplexity": metrics[-1].get("codebook/perplexity")}, indent=2))
    return 0


def sample_both_directions(checkpoint: str | None, out: Path, n: int, candidates: int | None = None) -> int:
    """Draw images for n test captions and captions for n test images with the sampling defaults
    (those of ``sample.py``; ``candidates`` overrides theirs), and judge both."""
    import torch

    from lverse.files import save_grid
    from lverse.inference.pipeline import LVersePipeline
    from lverse.shapes.benchmark import run_benchmark

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = LVersePipeline.load(checkpoint, device="cpu")
    t2i = pipe.defaults("text_to_image", candidates=candidates)
    i2t = pipe.defaults("image_to_text", candidates=candidates)
    if t2i.candidates != i2t.candidates:
        raise ValueError(f"the demo draws as many candidates in both directions; the bundle's sampling.json asks "
                         f"for {t2i.candidates} images and {i2t.candidates} captions (pass --candidates)")
    print(f"[demo] {pipe.path}: {n} captions -> images (reranked by {t2i.rerank}) and {n} images -> captions "
          f"(reranked by {i2t.rerank}), {t2i.candidates} candidates each", file=sys.stderr)
    picks: dict = {}
    report = run_benchmark(pipe, n=n, candidates=t2i.candidates, rerankers=sorted({t2i.rerank, i2t.rerank}), seed=1,
                           picks=picks, log=lambda s: None)
    out.mkdir(parents=True, exist_ok=True)
    # grid: row 1 the test scenes, row 2 the images generated from their captions
    grid = save_grid(torch.cat([picks["truth_images"], picks[f"images/{t2i.rerank}"]]), out / "text_to_image.png",
                     nrow=n)
    captions = [{"image": i, "true caption": t, "generated caption": c}
                for i, (t, c) in enumerate(zip(picks["truth_captions"], picks[f"captions/{i2t.rerank}"]))]
    save_grid(picks["truth_images"], out / "test_images.png", nrow=n)
    summary = {
        "text_to_image_exact": report["text_to_image"][t2i.rerank]["exact"],
        "image_to_text_exact": report["image_to_text"][i2t.rerank]["exact"],
        "reconstruction_exact": report["reconstruction"]["exact"],
        "text_to_image_grid": str(grid),
        "captions": captions,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    for c in captions:
        print(f"  image {c['image']}: {c['generated caption']!r}  (true: {c['true caption']!r})")
    print(f"[demo] judged accuracy: text->image {summary['text_to_image_exact']:.0%}, "
          f"image->text {summary['image_to_text_exact']:.0%}, reconstruction {summary['reconstruction_exact']:.0%}")
    print(f"[demo] wrote {grid} (top: test scenes, bottom: generated from their captions), "
          f"{out / 'test_images.png'} and {out / 'demo.json'}")
    return 0

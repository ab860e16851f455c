"""Bundle trained runs into the checkpoint directory `sample.py` loads.

    python -m lverse.bundle --augvae runs/shapes_augvae_sl --biart runs/shapes_biart \
        [--clip runs/shapes_clip/clip.safetensors] --out checkpoints/shapes

The AugVAE-SL and BiART may be given as weights files or run directories (their exported
``model.safetensors``, else their latest checkpoint); the tokenizer is the one saved with the
BiART run. The bundle is checked for consistency (vocabulary sizes, token grid) on the way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .models.augvae import AugVAE
from .models.biart import BiART
from .pipeline import LVersePipeline, load_clip
from .tokenizer import TextTokenizer
from .train.stage1 import resolve_weights


def find_tokenizer(biart_path: str | Path) -> Path:
    p = Path(biart_path)
    weights = resolve_weights(p)
    for cand in (weights.parent / "tokenizer.json", p / "tokenizer.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no tokenizer.json next to {weights} or in {p}; pass --tokenizer")


def trained_text_dropout(biart_path: str | Path) -> float | None:
    """``text_dropout`` from the BiART run's resolved config, if the run directory has one."""
    p = Path(biart_path)
    cfg = p / "config.yaml" if p.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    import yaml

    data = yaml.safe_load(cfg.read_text()) or {}
    return float(data.get("text_dropout", 0.0)) if isinstance(data, dict) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lverse.bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--augvae", required=True)
    ap.add_argument("--biart", required=True)
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--clip", default="", help="clip.safetensors (optional)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--guidance", type=float, default=None,
                    help="recommend classifier-free guidance at this scale for text->image (sampling.json); "
                         "only for a BiART trained with text_dropout > 0")
    ap.add_argument("--image-temperature", type=float, default=None,
                    help="recommend this sampling temperature for text->image (sampling.json; default 1)")
    args = ap.parse_args(argv)
    try:
        augvae = AugVAE.load(resolve_weights(args.augvae))
        biart = BiART.load(resolve_weights(args.biart)).float()
        tokenizer = TextTokenizer.load(args.tokenizer or find_tokenizer(args.biart))
        sampling: dict[str, float] = {} if args.guidance is None else {"guidance": args.guidance}
        if args.image_temperature is not None:
            sampling["image_temperature"] = args.image_temperature
        if args.guidance not in (None, 1.0) and trained_text_dropout(args.biart) == 0.0:
            print(f"warning: --guidance {args.guidance:g}, but {args.biart} was trained with text_dropout 0: it never saw "
                  "the empty caption that guidance contrasts with, so guided images will be worse", file=sys.stderr)
        pipe = LVersePipeline(augvae, biart, tokenizer, sampling=sampling)
        if args.clip:
            model, meta = load_clip(args.clip)
            pipe.set_clip(model, meta["model_cfg"], meta.get("model_name", "custom"))
            pipe._clip_meta = meta  # keep preprocessing and training notes with the bundle
        out = pipe.save(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[bundle] wrote {out} ({total / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

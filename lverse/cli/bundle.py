"""``lverse bundle``: trained runs → the checkpoint directory ``sample.py`` loads."""
from __future__ import annotations

import argparse
import sys

from lverse.inference.bundle import make_bundle, trained_text_dropout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lverse bundle", description="Bundle an AugVAE-SL, a BiART (with its tokenizer) "
                                 "and optionally a CLIP into one checkpoint directory.")
    ap.add_argument("--augvae", required=True, help="AugVAE-SL weights or stage-1 run directory")
    ap.add_argument("--biart", required=True, help="BiART weights or stage-2 run directory")
    ap.add_argument("--tokenizer", default="", help="default: the tokenizer.json saved with the BiART run")
    ap.add_argument("--clip", default="", help="clip.safetensors (optional)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--guidance", type=float, default=None,
                    help="recommend classifier-free guidance at this scale for text->image (sampling.json); "
                         "only for a BiART trained with text_dropout > 0")
    ap.add_argument("--image-temperature", type=float, default=None,
                    help="recommend this sampling temperature for text->image (sampling.json; default 1)")
    args = ap.parse_args(argv)
    sampling: dict[str, float] = {} if args.guidance is None else {"guidance": args.guidance}
    if args.image_temperature is not None:
        sampling["image_temperature"] = args.image_temperature
    try:
        if args.guidance not in (None, 1.0) and trained_text_dropout(args.biart) == 0.0:
            print(f"warning: --guidance {args.guidance:g}, but {args.biart} was trained with text_dropout 0: it never saw "
                  "the empty caption that guidance contrasts with, so guided images will be worse", file=sys.stderr)
        out = make_bundle(args.augvae, args.biart, args.out, args.tokenizer or None, args.clip or None, sampling)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[bundle] wrote {out} ({total / 1e6:.1f} MB)", file=sys.stderr)
    return 0

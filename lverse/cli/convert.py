"""``lverse convert``: an official AugVAE Lightning checkpoint → lverse safetensors."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lverse.convert import convert_official


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="lverse convert",
        description="Convert an official L-Verse AugVAE checkpoint (.ckpt) to lverse (.safetensors + .json).",
    )
    p.add_argument("checkpoint", help="official PyTorch Lightning checkpoint (AugVAE-ML or -SL)")
    p.add_argument("out", help="output path (.safetensors; the .json config is written beside it)")
    p.add_argument("--variant", choices=("ml", "sl"), default=None, help="default: detect from the keys")
    a = p.parse_args(argv)
    try:
        model = convert_official(a.checkpoint, a.variant)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = model.save(a.out)
    print(
        f"wrote {out} ({model.cfg.variant.upper()}, {model.num_parameters():,} parameters, "
        f"{model.tokens_per_image} tokens/image, grids {model.token_grids})"
    )
    return 0


"""``lverse train-tokenizer``: a BPE for a small domain (Shapes) with CLIP's recipe."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lverse.tokenizer import TextTokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lverse train-tokenizer", description="Train a BPE on a caption corpus (CLIP's normalisation and pre-tokenisation).")
    ap.add_argument("--data", default="shapes", choices=["shapes", "text"], help="shapes: every phrasing of Shapes scenes; text: a file with one caption per line")
    ap.add_argument("--path", default="", help="--data text: the caption file")
    ap.add_argument("--size", type=int, default=20000, help="Shapes scenes to collect captions from")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", required=True, help="tokenizer.json to write")
    args = ap.parse_args(argv)
    if args.data == "shapes":
        from lverse.shapes.scenes import ShapesDataset, phrasings

        texts: list[str] = []
        for split in ("train", "test"):
            ds = ShapesDataset(split, size=args.size, seed=0)
            for i in range(len(ds)):
                texts.extend(phrasings(ds.scene(i)))
    else:
        p = Path(args.path)
        if not p.is_file():
            print(f"error: caption file not found: {p}", file=sys.stderr)
            return 2
        texts = [t for t in p.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    tok = TextTokenizer.train(texts, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(json.dumps({"vocab_size": tok.vocab_size, "captions": len(texts), "out": args.out}))
    return 0

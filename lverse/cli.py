"""The `lverse` command: small tools around the training scripts.

    lverse encode ...            AugVAE-SL → token shards for BiART (see lverse.encode)
    lverse train-tokenizer ...   a BPE for a small domain (Shapes) with the CLIP recipe
    lverse convert ...           official AugVAE .ckpt → lverse safetensors
"""
from __future__ import annotations

import argparse
import json
import sys


def train_tokenizer_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lverse train-tokenizer", description="Train a BPE on a caption corpus (CLIP's normalisation and pre-tokenisation).")
    ap.add_argument("--data", default="shapes", choices=["shapes", "text"], help="shapes: every phrasing of Shapes scenes; text: a file with one caption per line")
    ap.add_argument("--path", default="", help="--data text: the caption file")
    ap.add_argument("--size", type=int, default=20000, help="Shapes scenes to collect captions from")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", required=True, help="tokenizer.json to write")
    args = ap.parse_args(argv)
    from pathlib import Path

    from .tokenizer import TextTokenizer

    if args.data == "shapes":
        from .data.shapes import ShapesDataset, phrasings

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"encode", "train-tokenizer", "convert"}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "encode":
        from .encode import main as encode_main

        return encode_main(rest)
    if cmd == "train-tokenizer":
        return train_tokenizer_main(rest)
    from .convert import main as convert_main

    return int(convert_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

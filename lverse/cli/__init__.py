"""The ``lverse`` command: one entry point, a thin argument parser per subcommand.

    lverse train-augvae ...     stage 1: AugVAE-ML, or AugVAE-SL finetuned from it (= train_augvae.py)
    lverse encode ...           AugVAE-SL -> token shards for BiART
    lverse train-biart ...      stage 2: BiART on token shards (= train_biart.py)
    lverse train-tokenizer ...  a BPE for a small domain (Shapes) with CLIP's recipe
    lverse bundle ...           trained runs -> the checkpoint directory sampling loads
    lverse sample ...           text -> images, image -> captions, reranked (= sample.py)
    lverse convert ...          an official AugVAE .ckpt -> lverse safetensors
    lverse evaluate ...         the papers' protocols: captions, t2i, recon, cycle, shapes
    lverse demo ...             the Shapes demo on the shipped checkpoints (the README's main job)
    lverse benchmark ...        the Shapes benchmark: every stage judged on a fixed test set
    lverse train-clip ...       the tiny Shapes CLIP used for reranking
    lverse serve ...            a local web page to try both directions (needs lverse[serve])

``lverse SUBCOMMAND --help`` lists each one's options.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str]] = {
    "train-augvae": ("lverse.cli.train", "train_augvae"),
    "encode": ("lverse.cli.encode", "main"),
    "train-biart": ("lverse.cli.train", "train_biart"),
    "train-tokenizer": ("lverse.cli.tokenizer", "main"),
    "bundle": ("lverse.cli.bundle", "main"),
    "sample": ("lverse.cli.sample", "main"),
    "convert": ("lverse.cli.convert", "main"),
    "demo": ("lverse.cli.shapes", "demo"),
    "benchmark": ("lverse.cli.shapes", "benchmark"),
    "train-clip": ("lverse.cli.shapes", "train_clip"),
    "evaluate": ("lverse.cli.evaluate", "main"),
    "serve": ("lverse.cli.serve", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

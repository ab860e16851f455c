#!/usr/bin/env python
"""Shapes benchmark report (see lverse/eval/benchmark.py):

    python bench/shapes_eval.py --checkpoint checkpoints/shapes --n 500 --candidates 16
    python bench/shapes_eval.py --checkpoint B --directions text_to_image   # one direction only
"""
import sys

from lverse.eval.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

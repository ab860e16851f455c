#!/usr/bin/env python
"""Sample from L-Verse: ``--text "..."`` makes images, ``--image x.jpg`` makes captions.

    python sample.py --text "a red circle above a blue square" --candidates 64 --keep 4
    python sample.py --image photos/ --rerank cycle

All logic lives in :mod:`lverse.cli_sample`; ``python sample.py --help`` lists the options.
"""
import sys

from lverse.cli_sample import main

if __name__ == "__main__":
    sys.exit(main())

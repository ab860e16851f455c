#!/usr/bin/env python
"""Sampling: ``python sample.py --text "..."`` makes images, ``--image x.jpg`` captions (= ``lverse sample``)."""
from lverse.cli.sample import main

raise SystemExit(main())

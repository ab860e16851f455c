#!/usr/bin/env python
"""Stage 2: ``python train_biart.py --config configs/biart_coco_paper.yaml`` (= ``lverse train-biart``)."""
from lverse.cli.train import train_biart

raise SystemExit(train_biart())

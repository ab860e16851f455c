#!/usr/bin/env python
"""Stage 1: ``python train_augvae.py --config configs/augvae_ml_paper.yaml`` (= ``lverse train-augvae``)."""
from lverse.cli.train import train_augvae

raise SystemExit(train_augvae())

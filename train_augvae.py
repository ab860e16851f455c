#!/usr/bin/env python
"""Stage 1: train AugVAE-ML, or finetune it into AugVAE-SL.

    python train_augvae.py --config configs/shapes_augvae_ml.yaml
    python train_augvae.py --config configs/augvae_ml_paper.yaml --describe
    torchrun --nproc_per_node 8 train_augvae.py --config configs/augvae_ml_paper.yaml data.path=/data/imagenet/train
    python train_augvae.py --resume runs/shapes_augvae_ml
"""
import sys

from lverse.train.stage1 import main

if __name__ == "__main__":
    sys.exit(main())

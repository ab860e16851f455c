#!/usr/bin/env python
"""Stage 2: train BiART on token shards written by `lverse encode`.

    python train_biart.py --config configs/shapes_biart.yaml
    python train_biart.py --config configs/biart_coco_paper.yaml --describe
    torchrun --nproc_per_node 8 train_biart.py --config configs/biart_coco_paper.yaml data.tokens=[/data/coco_tokens]
    python train_biart.py --resume runs/shapes_biart
"""
import sys

from lverse.train.stage2 import main

if __name__ == "__main__":
    sys.exit(main())

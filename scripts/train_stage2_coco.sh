#!/usr/bin/env bash
# Stage 2 on MS-COCO (paper recipe): BiART, FP16-O2, lr = 4.5e-7 x global batch.
#   1. encode once:  lverse encode --augvae AUGVAE_SL --data coco --path dataset_coco.json \
#                        --image-root /data/coco --split train --out /data/coco_tokens
#   2. train:        TOKENS=/data/coco_tokens GPUS=8 bash scripts/train_stage2_coco.sh
# Multi-node: NNODES, MASTER_ADDR as for stage 1. Extra args are config overrides. Running it
# again (a requeue, a torchrun restart: MAX_RESTARTS, see env.sh) continues from the newest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${TOKENS:?set TOKENS to the token directory written by lverse encode}"
lverse_torchrun train_biart.py --config "${CONFIG:-configs/biart_coco_paper.yaml}" --resume auto "data.tokens=[$TOKENS]" "$@"

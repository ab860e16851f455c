#!/usr/bin/env bash
# Stage 2 on Conceptual Captions 3M (paper scale experiment): BiART, FP16-O2, lr = 4.5e-7 x global batch.
#   1. encode once:  lverse encode --augvae AUGVAE_SL --data cc --path cc3m.tsv \
#                        --image-root /data/cc3m --out /data/cc3m_tokens
#   2. train:        TOKENS=/data/cc3m_tokens GPUS=8 bash scripts/train_stage2_cc3m.sh
# Multi-node: NNODES, MASTER_ADDR as for stage 1. Extra args are config overrides. Running it
# again (a requeue, a torchrun restart: MAX_RESTARTS, see env.sh) continues from the newest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${TOKENS:?set TOKENS to the token directory written by lverse encode}"
lverse_torchrun train_biart.py --config "${CONFIG:-configs/biart_cc3m_paper.yaml}" --resume auto "data.tokens=[$TOKENS]" "$@"

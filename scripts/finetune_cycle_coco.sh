#!/usr/bin/env bash
# Reconstruction-regularised finetuning of a COCO-trained BiART (the reconstruction paper's
# recipe where it transfers: lr 1e-4, batch 8, 5 epochs, query projections only; why and what
# differs: docs/reconstruction.md).
#   TOKENS=/data/coco_tokens INIT=runs/biart_coco_paper bash scripts/finetune_cycle_coco.sh
# GPUS (default 1: the paper's single A10 and batch 8), extra args are config overrides, e.g.
# cycle.trainable=all or cycle.freeze=second. Running it again continues from the newest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${TOKENS:?set TOKENS to the COCO token directory written by lverse encode}"
: "${INIT:?set INIT to the COCO-trained BiART (a stage-2 run directory or its model.safetensors)}"
GPUS="${GPUS:-1}"
BATCH=$(( 8 / GPUS ))  # the paper's global batch of 8
if [ "$BATCH" -lt 1 ] || [ $(( BATCH * GPUS )) -ne 8 ]; then
  echo "error: GPUS=$GPUS does not divide the paper's batch of 8" >&2
  exit 2
fi
lverse_torchrun train_biart.py --config "${CONFIG:-configs/biart_coco_cycle_paper.yaml}" --resume auto \
  "data.tokens=[$TOKENS]" init_from="$INIT" train.batch_size="$BATCH" "$@"

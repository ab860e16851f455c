#!/usr/bin/env bash
# Stage 1b: finetune a trained AugVAE-ML into AugVAE-SL (32x32 tokens at 256 px).
#   Paper recipe:  DATA=/data/imagenet/train ML=runs/augvae_ml_paper GPUS=8 bash scripts/finetune_stage1_sl.sh
#   Tiny Shapes:   RECIPE=shapes bash scripts/finetune_stage1_sl.sh   (after RECIPE=shapes train_stage1_ml.sh)
# Extra arguments are config overrides. Running it again continues the run (--resume auto, env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RECIPE="${RECIPE:-paper}"
if [ "$RECIPE" = shapes ]; then
  exec python train_augvae.py --config configs/shapes_augvae_sl.yaml init_from="${ML:-runs/shapes_augvae_ml}" "$@"
fi
: "${DATA:?set DATA to the ImageNet train folder (class sub-folders) or a tar-shard glob}"
: "${ML:?set ML to the AugVAE-ML run directory or model.safetensors}"
KIND="${KIND:-folder}"
STREAM=(); [ "$KIND" = tar ] && STREAM=(train.max_epochs=0 train.schedule=plateau)  # shards have no epochs
lverse_torchrun train_augvae.py --config configs/augvae_sl_paper.yaml --resume auto init_from="$ML" data.kind="$KIND" \
  data.path="$DATA" ${STREAM[@]+"${STREAM[@]}"} "$@"

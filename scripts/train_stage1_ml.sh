#!/usr/bin/env bash
# Stage 1a: train AugVAE-ML.
#   Paper recipe (ImageNet-1K, 8 images per GPU, lr = 4.5e-6 x global batch):
#     DATA=/data/imagenet/train GPUS=8 bash scripts/train_stage1_ml.sh
#   Multi-node: NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 DATA=... GPUS=8 bash scripts/train_stage1_ml.sh
#   Tiny Shapes recipe on a laptop CPU (no data needed):
#     RECIPE=shapes bash scripts/train_stage1_ml.sh
# Extra arguments are config overrides, e.g. train.max_steps=1000. Resume: add --resume.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RECIPE="${RECIPE:-paper}"
if [ "$RECIPE" = shapes ]; then
  exec python train_augvae.py --config configs/shapes_augvae_ml.yaml "$@"
fi
: "${DATA:?set DATA to the ImageNet train folder (class sub-folders) or a tar-shard glob}"
KIND="${KIND:-folder}"
GPUS="${GPUS:-1}"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  train_augvae.py --config configs/augvae_ml_paper.yaml data.kind="$KIND" data.path="$DATA" "$@"

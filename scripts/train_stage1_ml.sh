#!/usr/bin/env bash
# Stage 1a: train AugVAE-ML.
#   Paper recipe (ImageNet-1K, 8 images per GPU, lr = 4.5e-6 x global batch):
#     DATA=/data/imagenet/train GPUS=8 bash scripts/train_stage1_ml.sh
#   Multi-node: NNODES=2 MASTER_ADDR=host0 DATA=... GPUS=8 bash scripts/train_stage1_ml.sh (on every node)
#   Tiny Shapes recipe on a laptop CPU (no data needed):
#     RECIPE=shapes bash scripts/train_stage1_ml.sh
# Extra arguments are config overrides, e.g. train.max_epochs=1. Running it again (a requeue, a
# torchrun restart: MAX_RESTARTS, see env.sh) continues the run from its newest checkpoint.
# KIND=tar streams shards, which have no epochs: the budget is then train.max_steps.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RECIPE="${RECIPE:-paper}"
if [ "$RECIPE" = shapes ]; then
  exec python train_augvae.py --config configs/shapes_augvae_ml.yaml "$@"
fi
: "${DATA:?set DATA to the ImageNet train folder (class sub-folders) or a tar-shard glob}"
KIND="${KIND:-folder}"
STREAM=(); [ "$KIND" = tar ] && STREAM=(train.max_epochs=0 train.schedule=plateau)
lverse_torchrun train_augvae.py --config configs/augvae_ml_paper.yaml --resume auto data.kind="$KIND" data.path="$DATA" \
  ${STREAM[@]+"${STREAM[@]}"} "$@"

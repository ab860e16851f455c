#!/usr/bin/env bash
# Stage 2, tiny Shapes recipe on a CPU: tokenizer, token encoding, BiART.
#   SL=runs/shapes_augvae_sl bash scripts/train_stage2_shapes.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
SL="${SL:-runs/shapes_augvae_sl}"
[ -f runs/shapes_tokenizer.json ] || lverse train-tokenizer --data shapes --vocab-size 600 --out runs/shapes_tokenizer.json
[ -f runs/shapes_tokens/meta.json ] || lverse encode --augvae "$SL" --data shapes --size "${SIZE:-20000}" --out runs/shapes_tokens --num-workers 0
exec python train_biart.py --config configs/shapes_biart.yaml "$@"

#!/usr/bin/env bash
# The Shapes ablation of reconstruction-regularised finetuning (docs/reconstruction.md): the
# reconstruction paper's Tables 5 and 9 in miniature. Every variant finetunes the shipped BiART
# for the same STEPS on the same data (configs/shapes_biart_cycle.yaml), is bundled with the
# shipped AugVAE and CLIP, and benchmarked with the default sampler on N test scenes.
#   TOKENS=runs/shapes_tokens bash scripts/shapes/ablation_cycle.sh [variant ...]
# TOKENS: Shapes train tokens (lverse encode --augvae checkpoints/shapes/augvae.safetensors --data
# shapes --split train --size 5000 --out runs/shapes_tokens5k). OUT (default runs/cycle_ablation),
# STEPS (default 120), N (default 100), SEED (default 0: the finetune's data order). Each job takes
# the shared lock (LOCK, default /tmp/lverse-heavy.lock) when one is given, so heavy jobs queue.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
: "${TOKENS:?set TOKENS to Shapes train tokens from lverse encode}"
OUT="${OUT:-runs/cycle_ablation}"; STEPS="${STEPS:-120}"; N="${N:-100}"; SEED="${SEED:-0}"
LOCK="${LOCK:-/tmp/lverse-heavy.lock}"
heavy() { if [ -n "$LOCK" ]; then flock "$LOCK" nice -n 5 "$@"; else "$@"; fi; }
mkdir -p "$OUT"
# variant -> cycle overrides (Table 5 and Table 9 of the paper, with one shared BiART)
declare -A V=(
  [supervised]="cycle.w_ir=0 cycle.w_tr=0"                     # (a) L_TG + L_IG only: plain finetuning
  [all]=""                                                      # (b) all four losses, both passes train
  [reconstruction]="cycle.w_tg=0 cycle.w_ig=0"                  # (c) L_IR + L_TR only
  [frozen_second]="cycle.freeze=second"                         # (d) Table 9 row 3: the reconstructing pass frozen
  [frozen_first]="cycle.freeze=first"                           # (d) Table 9 row 4: the first pass frozen ("augmentation")
  [query]="cycle.trainable=query"                               # all four, query projections only (the paper's choice)
)
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(supervised all reconstruction frozen_second frozen_first)
for v in "${variants[@]}"; do
  run="$OUT/${v}_s$SEED"
  if [ ! -f "$run/model.safetensors" ]; then
    # shellcheck disable=SC2086
    heavy python train_biart.py --config configs/shapes_biart_cycle.yaml --resume auto "data.tokens=[$TOKENS]" \
      train.run_dir="$run" train.max_steps="$STEPS" train.seed="$SEED" train.progress=false ${V[$v]} > "$run.log" 2>&1
  fi
  [ -f "$run/bundle/biart.safetensors" ] || lverse bundle --augvae checkpoints/shapes/augvae.safetensors --biart "$run" \
    --clip checkpoints/shapes/clip.safetensors --out "$run/bundle" >> "$run.log" 2>&1
  [ -f "$run/bundle/report.json" ] || heavy lverse benchmark --checkpoint "$run/bundle" --n "$N" --out "$run/bundle" >> "$run.log" 2>&1
  echo "[ablation] $v done: $run/bundle/report.md"
done

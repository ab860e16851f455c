#!/usr/bin/env bash
# The whole L-Verse recipe on the built-in Shapes data, sized for a 2-core CPU (faster on a GPU):
#   1. stage 1a  AugVAE-ML                       runs/shapes_augvae_ml
#   2. stage 1b  AugVAE-SL finetuned from it     runs/shapes_augvae_sl
#      stage 1c  its decoder side finetuned      runs/shapes_augvae_sl_dec  (ours; same token ids)
#   3. a Shapes BPE (CLIP's recipe)              runs/shapes_tokenizer.json
#   4. token encoding with the AugVAE-SL         runs/shapes_tokens
#   5. stage 2   BiART                           runs/shapes_biart
#   6. a tiny CLIP trained contrastively         runs/shapes_clip
#   7. the bundle sample.py loads                $OUT (default checkpoints/shapes)
#   8. the benchmark report                      $OUT/report.md (+ .json)
# Each step is skipped when its output exists, so a killed run continues where it stopped
# (an interrupted training step resumes from its last checkpoint). FRESH=1 starts over.
#   bash scripts/shapes/train_all.sh
# Environment: OUT, RUNS, DEVICE (auto|cpu|cuda), PRECISION (default: bf16 on a GPU or on a CPU
# with native bf16 (avx512_bf16/amx), else fp32: emulated bf16 is slower than fp32), THREADS
# (intra-op threads per process, default all cores), SCENES (scenes encoded for the BiART, default
# 60000: the BiART overfits 20,000), EVAL_N, EVAL_CANDIDATES, FRESH.
# Stages run one after another: on a 2-core box two jobs side by side each crawl.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
OUT="${OUT:-checkpoints/shapes}"
RUNS="${RUNS:-runs}"
DEVICE="${DEVICE:-auto}"
EVAL_N="${EVAL_N:-500}"
EVAL_CANDIDATES="${EVAL_CANDIDATES:-64}"
THREADS="${THREADS:-0}"
SCENES="${SCENES:-60000}"
# Whether the stages will run on a GPU: decided once, for the precision and the encoding batch.
if [[ "$DEVICE" == cuda* ]] || { [ "$DEVICE" = auto ] && python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }; then
  ON_GPU=1
else
  ON_GPU=0
fi
if [ -z "${PRECISION:-}" ]; then
  if [ "$ON_GPU" = 1 ] || grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=bf16; else PRECISION=fp32; fi
fi
[ "${FRESH:-0}" = 1 ] && rm -rf "$RUNS"/shapes_augvae_ml "$RUNS"/shapes_augvae_sl "$RUNS"/shapes_augvae_sl_dec "$RUNS"/shapes_tokenizer.json \
  "$RUNS"/shapes_tokens "$RUNS"/shapes_biart "$RUNS"/shapes_clip
mkdir -p "$RUNS"
start=$(date +%s)
echo "[train_all] started $(date -u +%FT%TZ): device=$DEVICE precision=$PRECISION threads=$THREADS" | tee -a "$RUNS/shapes_train_all.log"
stamp() { echo "[train_all] $1 done after $(( $(date +%s) - start ))s" | tee -a "$RUNS/shapes_train_all.log"; }

train_stage() {  # $1 script, $2 config, $3 run dir, rest: overrides; resumes a half-finished run
  local script=$1 config=$2 dir=$3; shift 3
  if [ -f "$dir/model.safetensors" ]; then return; fi
  if [ -f "$dir/checkpoints/latest" ]; then
    python "$script" --resume "$dir" "$@"
  else
    python "$script" --config "$config" train.run_dir="$dir" train.device="$DEVICE" train.precision="$PRECISION" \
      train.threads="$THREADS" "$@"
  fi
}

train_stage train_augvae.py configs/shapes_augvae_ml.yaml "$RUNS/shapes_augvae_ml"; stamp "stage 1a (AugVAE-ML)"
train_stage train_augvae.py configs/shapes_augvae_sl.yaml "$RUNS/shapes_augvae_sl" init_from="$RUNS/shapes_augvae_ml"; stamp "stage 1b (AugVAE-SL)"
train_stage train_augvae.py configs/shapes_augvae_sl_decoder.yaml "$RUNS/shapes_augvae_sl_dec" init_from="$RUNS/shapes_augvae_sl"; stamp "stage 1c (AugVAE-SL decoder)"
[ -f "$RUNS/shapes_tokenizer.json" ] || lverse train-tokenizer --data shapes --vocab-size 600 --out "$RUNS/shapes_tokenizer.json"
if [ -f "$RUNS/shapes_tokens/meta.json" ]; then  # kept from an earlier run: it must hold SCENES scenes
  have=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_items"])' "$RUNS/shapes_tokens/meta.json")
  if [ "$have" != "$SCENES" ]; then
    echo "[train_all] error: $RUNS/shapes_tokens holds $have scenes, SCENES is $SCENES: remove it (or set SCENES=$have)" >&2
    exit 2
  fi
fi
# Batches of 8 on a CPU: 64-pixel images encode 1.5x faster than in batches of 64 here (the same ids)
if [ "$ON_GPU" = 1 ]; then ENCODE_BATCH=64; else ENCODE_BATCH=8; fi
[ -f "$RUNS/shapes_tokens/meta.json" ] || lverse encode --augvae "$RUNS/shapes_augvae_sl" --data shapes --size "$SCENES" \
  --out "$RUNS/shapes_tokens" --num-workers 0 --device "$DEVICE" --batch-size "$ENCODE_BATCH"
stamp "tokenizer + encoding"
train_stage train_biart.py configs/shapes_biart.yaml "$RUNS/shapes_biart" "data.tokens=[$RUNS/shapes_tokens]" data.tokenizer="$RUNS/shapes_tokenizer.json"; stamp "stage 2 (BiART)"
[ -f "$RUNS/shapes_clip/clip.safetensors" ] || lverse train-clip --config configs/shapes_clip.yaml train.run_dir="$RUNS/shapes_clip" \
  train.threads="$THREADS"
stamp "CLIP"
lverse bundle --augvae "$RUNS/shapes_augvae_sl_dec" --biart "$RUNS/shapes_biart" --clip "$RUNS/shapes_clip/clip.safetensors" --out "$OUT"
lverse benchmark --checkpoint "$OUT" --n "$EVAL_N" --candidates "$EVAL_CANDIDATES" --out "$OUT"
stamp "bundle + benchmark"

#!/usr/bin/env bash
# Every paper-size measurement of docs/benchmarks.md on one GPU, in under 8 minutes on an H100.
#
#   bash bench/gpu.sh [OUT_DIR]             # OUT_DIR: default $OUT, else bench-out/
#   LVERSE_BENCH_TINY=1 bash bench/gpu.sh   # the same script at tiny sizes on the CPU (a dry run)
#
# Writes one JSON per measurement, summary.json and summary.md (bench/summarize.py) in OUT_DIR, and
# each command's output in OUT_DIR/logs/. Every step has its own time limit, so one that hangs or
# fails costs its limit only; the others still run and the summary says which failed.
#
# Needs PyTorch with CUDA. lverse itself is not installed: this runs from the checkout
# (PYTHONPATH). The benchmarks import only torch and lverse's modules, which need a few small
# packages; if the GPU machine lacks them and has no network, bring them as wheels:
#   (on a machine with network, same Python version and platform)
#   pip download --only-binary=:all: -d wheels pyyaml safetensors pillow tokenizers ftfy regex wcwidth numpy tqdm
#   (on the GPU machine)
#   pip install --no-index --find-links wheels pyyaml safetensors pillow tokenizers ftfy regex wcwidth numpy tqdm
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT_DIR/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# $PYTHON if set, else the checkout's .venv if there is one, else python on the PATH
PY="${PYTHON:-python}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
TINY="${LVERSE_BENCH_TINY:-0}"
[ "$TINY" = "0" ] && TINY=""

if ! command -v "$PY" > /dev/null; then
  echo "error: no Python interpreter '$PY' here (set PYTHON=/path/to/python with PyTorch and CUDA)" >&2
  exit 2
fi
if ! missing=$("$PY" - <<'EOF'
import importlib.util
mods = ["torch", "numpy", "yaml", "safetensors", "PIL", "tokenizers", "ftfy", "regex", "tqdm"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
); then
  echo "error: $PY could not check its modules (see above)" >&2
  exit 2
fi
if [ -n "$missing" ]; then
  echo "error: $PY lacks the Python modules: $missing (set PYTHON=..., or see the wheel instructions at the top of bench/gpu.sh)" >&2
  exit 2
fi
if [ -z "$TINY" ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); for a CPU dry run set LVERSE_BENCH_TINY=1" >&2
    exit 2
  fi
  DEV=cuda
  TRAIN="--paper --rounds 5"
  SAMPLE="--paper --batch 64"
  AUG="--paper --batch 64 --train-batch 8 --rounds 3"
else
  DEV=cpu
  TRAIN="--layers 2 --width 64 --heads 2 --image-len 64 --text-len 16 --rounds 2"
  SAMPLE="--layers 2 --width 64 --heads 2 --grid 8 --batch 4"
  AUG="--width 16 --resolution 32 --batch 2 --rounds 2"
fi

status=0
step() {  # step NAME LIMIT_SECONDS ARGS...: run one benchmark, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  if timeout "$limit" "$PY" "$@" --device "$DEV" --json "$OUT_DIR/$name.json" > "$OUT_DIR/logs/$name.txt" 2>&1; then
    echo "   done in $((SECONDS - t0)) s"
  else
    echo "   FAILED or timed out after $((SECONDS - t0)) s (see $OUT_DIR/logs/$name.txt)"
    status=1
  fi
}

# The limits add up to 470 s: with Python's start-ups the whole script stays under 8 minutes.
# Training: BiART (chunked loss), BiART with full logits, the GPT reference, bf16 and fp16-o2;
# then BiART through torch.compile in bf16 (compiling 32 layers takes most of that step's time).
step train 90 bench/train_throughput.py $TRAIN --precision bf16,fp16-o2
step train_compile 125 bench/train_throughput.py $TRAIN --precision bf16 --compile on --variants biart
# Sampling: 64 candidates of 1024 tokens, the references and the draws; then the compiled step.
step sampling 100 bench/sampling.py $SAMPLE
step sampling_compile 90 bench/sampling.py $SAMPLE --uncached-batch 0 --compile-step --runs compiled_step
# AugVAE-SL: encode, decode, train, per precision and memory format.
step augvae 65 bench/augvae.py $AUG --precision bf16,fp16

"$PY" bench/summarize.py "$OUT_DIR" || status=1
echo "summaries: $OUT_DIR/summary.md, $OUT_DIR/summary.json"
exit $status

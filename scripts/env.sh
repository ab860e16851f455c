#!/usr/bin/env bash
# Source me: creates (once) and activates the project's virtual environment with every dependency.
# Pins for our machines and CI come from constraints.txt; setup.py keeps open ranges for users.
# LVERSE_VENV overrides the location (default: .venv in the repository).
set -euo pipefail
LVERSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LVERSE_VENV="${LVERSE_VENV:-$LVERSE_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$LVERSE_VENV/bin/python" ]; then
  echo "[lverse] creating virtual environment in $LVERSE_VENV" >&2
  "$PYTHON" -m venv "$LVERSE_VENV"
fi
# Reinstall only when setup.py or constraints.txt changed since the last install.
stamp="$LVERSE_VENV/.lverse-installed"
want="$(cat "$LVERSE_ROOT/setup.py" "$LVERSE_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[lverse] installing lverse and its dependencies (first run takes a few minutes)" >&2
  "$LVERSE_VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$LVERSE_VENV/bin/python" -m pip install --quiet -c "$LVERSE_ROOT/constraints.txt" -e "$LVERSE_ROOT[test]" >&2
  echo "$want" > "$stamp"
fi
# Chromium and its driver for the browser test of `lverse serve` (tests/test_serve_browser.py), from
# the system's packages (no browser download): installed once, quietly, where apt-get is there and
# we are root; elsewhere that test skips and says how to install them.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  echo "[lverse] installing chromium and chromium-driver for the browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "[lverse] warning: could not install chromium; the browser test will be skipped" >&2
fi
export PATH="$LVERSE_VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
cd "$LVERSE_ROOT"

# torchrun for the multi-GPU recipes. c10d rendezvous: NNODES nodes meet at MASTER_ADDR:MASTER_PORT
# (the first node); run the same command on every node. After a failure (a rank killed, a node
# lost) torchrun restarts the workers up to MAX_RESTARTS times, and `--resume auto` in the
# scripts continues from the run's newest checkpoint (a requeued job does the same).
lverse_torchrun() {
  exec torchrun --nnodes "${NNODES:-1}" --nproc_per_node "${GPUS:-1}" --max-restarts "${MAX_RESTARTS:-3}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-lverse}}" "$@"
}

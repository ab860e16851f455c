#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine, then runs the CPU test suite.
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k quantizer)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export CUDA_VISIBLE_DEVICES=""   # the suite is CPU-only by design, also on GPU machines
exec python -m pytest -q "$@" tests

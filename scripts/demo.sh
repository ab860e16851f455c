#!/usr/bin/env bash
# The main job: sets up the environment on a fresh machine, then runs the Shapes demo on the CPU.
#   bash scripts/demo.sh                 (extra arguments go to `python -m lverse.demo`)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m lverse.demo "$@"

#!/usr/bin/env bash
# The main job: sets up the environment on a fresh machine, then runs the Shapes demo on the CPU.
#   bash scripts/demo.sh                 sample both directions from checkpoints/shapes
#                                        (extra arguments go to `lverse demo`)
#   bash scripts/demo.sh --recipe        the full Shapes training run (scripts/shapes/train_all.sh,
#                                        ~44 min on 2 CPU cores) into runs/, bundled into
#                                        $OUT (default runs/shapes_bundle, so the shipped
#                                        checkpoints stay as they are), then the demo on it
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
source "$here/env.sh"
if [ "${1:-}" = "--recipe" ]; then
  shift
  export OUT="${OUT:-runs/shapes_bundle}"
  bash "$here/shapes/train_all.sh"
  exec lverse demo --checkpoint "$OUT" "$@"
fi
exec lverse demo "$@"

#!/usr/bin/env bash
# The GPU training job, one entry (docs/gpu.md): self-check, train the bundled world model on a
# pack for a wall-clock budget, export its EMA checkpoint to $OUT about every minute, benchmark
# the rollout, write $OUT/results.json. Extra arguments go to `python -m worldsim.train.gpu_job`
# (see its --help), e.g. `--minutes 6 --batch-size 256`; PACK (default runs/pack-mm9) names the
# pack folder, PYTHON the interpreter.
#
#   on the lent machine:  run(command="bash scripts/device/train_gpu.sh", carry=["runs/pack-mm9"], timeout_s=600)
#   anywhere with CUDA:   OUT=runs/gpu-out bash scripts/device/train_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for the results}"
PACK="${PACK:-runs/pack-mm9}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    elif command -v python3 >/dev/null; then PYTHON=python3
    else PYTHON=python; fi
fi
# No gymnasium / minari / mujoco on the lent machine: the job imports none of them.
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m worldsim.train.gpu_job --pack "$PACK" --out "$OUT" "$@"

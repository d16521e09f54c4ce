#!/usr/bin/env bash
# The speed issue's GPU checks in one run, for a machine with CUDA, PyTorch and Triton installed (no install
# step: the package runs from src/): the CUDA tests (fused kernel vs the for-loop, CUDA-graph capture of
# capturable/fused steps) and the step-speed benchmark at 10M–300M parameters, with % of the card's bandwidth.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [PEAK_GBPS]      # e.g. 4800 for an H200, 3350 for an H100 SXM
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [PEAK_GBPS]}
peak=${2:-}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_amp.py tests/test_8bit.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m adamnx perf --device cuda --sizes 1e7,1e8,3e8 --shapes large,small --reps 30 --rounds 2 \
    --memory-size 1e8 ${peak:+--peak-gbps "$peak"} --out "$out" 2>&1 | tee "$out/perf.log"

#!/usr/bin/env bash
# Issue 15's GPU run (one prepared script; see benchmarks/README.md, "GPU"): the transfer and cache
# tests with CUDA visible, the transfer-settings sweep (gpu_load_strategies.py), then gpu_bench.py
# (checkpoint to GPU, throughput against open_clip). Wheels of what the image lacks go in .whl/.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_transfer.py tests/test_gpu_overlap.py \
    tests/test_cache.py tests/test_checkpoint.py tests/test_security.py 2>&1 | tee "$OUT/tests.log" | tail -15
echo "tests rc=$?"
timeout "${STRATEGIES_S:-200}" python3 benchmarks/gpu_load_strategies.py --out "$OUT" 2>&1 | tee "$OUT/gpu_load_strategies.log" | tail -80
echo "strategies rc=$?"
timeout "${BENCH_S:-170}" python3 benchmarks/gpu_bench.py --out "$OUT" --budget-s 150 2>&1 | tee "$OUT/gpu_bench.log" | tail -40
echo "bench rc=$?"

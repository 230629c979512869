#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see benchmarks/README.md, "GPU"): the whole test suite with
# CUDA visible, verify on the GPU (one process, then 2 torchrun ranks), then the GPU benchmark
# (skipped with SKIP_BENCH=1). Needs the wheels of what that image lacks in .whl/ (open_clip, ftfy,
# wcwidth, omegaconf, hydra-core, antlr4, datasets, dill, multiprocess) and writes under $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests rc=$?"
timeout 120 python3 -m pool verify --device cuda --json "$OUT/verify_cuda.json" > "$OUT/verify_cuda.log" 2>&1
echo "verify --device cuda rc=$?"; tail -3 "$OUT/verify_cuda.log"
timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m pool verify --device cuda \
    --json "$OUT/verify_torchrun.json" > "$OUT/verify_torchrun.log" 2>&1
echo "torchrun verify --device cuda rc=$?"; tail -3 "$OUT/verify_torchrun.log"
if [ -z "$SKIP_BENCH" ]; then
  timeout "${BENCH_S:-300}" python3 benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -60
  echo "bench rc=$?"
fi

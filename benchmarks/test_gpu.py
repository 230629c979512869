"""GPU benchmarks: `gpu_bench.py` under pytest (skipped without CUDA), plus its CPU smoke run.

The smoke run keeps the GPU script from rotting on machines without a GPU: the same code paths
with a batch of 2, one round, on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _run(out: Path, *extra: str, timeout: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "gpu_bench.py"), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"gpu_bench.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "gpu_bench.json").read_text())


def test_gpu_bench_smoke_cpu(tmp_path):
    result = _run(tmp_path, "--smoke", timeout=600)
    assert result["load_to_gpu"]["timings"]
    vit = result["throughput"]["ViT-B-32"]
    assert vit["gflop_per_image"] > 1.0
    assert vit["max_abs_diff_fp32_ours_vs_open_clip"] < 1e-3
    assert result["multi_head"]["ViT-B-32"]["bf16_weights"]["encoder_plus_8_heads_images_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU benchmarks need one")
def test_gpu_bench_full(benchmark, tmp_path):
    out = Path(os.environ.get("POOL_BENCH_GPU_OUT", tmp_path))
    result: dict = {}
    benchmark.pedantic(lambda: result.update(_run(out, timeout=900)), rounds=1, iterations=1)
    benchmark.extra_info["gpu_bench"] = result
    assert result["throughput"], result["notes"]

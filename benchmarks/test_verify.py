"""``python -m pool verify`` over a real-size pool, beside a hand-written loop doing the same work.

The pool: the cached ViT-B-32 (or ``$POOL_BENCH_ARCHS``) zip pickle as ``_pretrained_`` and the
8 fine-tuned zip pickles, each with a classification head. The baseline is what a researcher
would write to check the same things: load each encoder through the pool, one forward of a
2-image batch, the task vector's L2 norm against ``_pretrained_`` (per tensor, float64
accumulation, as verify does), load its head and compute its logits. Target (issue 11): verify
costs at most 1.5x the hand loop, measured in the same run. No timing thresholds here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import benchlib
import pytest
import torch
from omegaconf import OmegaConf

from pool import OpenCLIPVisionModelPool, synth
from pool.arch import arch_for_name
from pool.cli import main

HEAD_CLASSES = (196, 47, 10, 43, 10, 45, 397, 10)


@pytest.fixture(scope="session")
def verify_config(arch, checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"verify-{arch}")
    embed = arch_for_name(arch).embed_dim
    models = {"_pretrained_": str(checkpoints["zip"])}
    heads = {}
    for i in range(benchlib.N_FINETUNED):
        models[f"task{i}"] = str(checkpoints[f"finetuned_{i}"])
        head = synth.make_original_head(HEAD_CLASSES[i % len(HEAD_CLASSES)], embed, seed=i)
        heads[f"task{i}"] = str(synth.save_module(head, root / f"head_task{i}.pt", "zip"))
    config = root / "pool.yaml"
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads}), config)
    return config


def hand_loop(config: Path) -> dict[str, float]:
    """What verify checks, written by hand: loads, forwards, task-vector norms, heads' logits."""
    pool = OpenCLIPVisionModelPool.from_config(config)
    images = torch.randn(2, 3, pool.architecture().image_size, pool.architecture().image_size,
                         generator=torch.Generator().manual_seed(0))
    norms = {}
    with torch.no_grad():
        pretrained = pool.load_pretrained_model().eval()
        pretrained(images)
        base = {k: v.detach() for k, v in pretrained.state_dict().items()}
        del pretrained
        for name in pool.model_names:
            encoder = pool.load_model(name).eval()
            features = encoder(images)
            total = 0.0
            for key, value in encoder.state_dict().items():
                if value.is_floating_point():
                    total += float(torch.linalg.vector_norm(value - base[key], dtype=torch.float64)) ** 2
            norms[name] = math.sqrt(total)
            pool.load_classification_head(name)(features)
            del encoder
    return norms


def run_verify(config: Path, report: Path) -> int:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return main(["verify", str(config), "--json", str(report)])


def test_verify_hand_loop(benchmark, arch, verify_config, rounds):
    """Baseline: the hand-written loop over the same pool."""
    benchmark.group = f"{arch} verify"
    seconds, n = benchlib.time_it(benchmark, lambda: hand_loop(verify_config), rounds=rounds["slow"])
    benchmark.extra_info.update({"arch": arch, "role": "baseline", "median_s": seconds, "rounds": n})
    benchlib.record(arch, "hand_loop", seconds, rounds=n, role="baseline")


def test_verify_cli(benchmark, arch, verify_config, rounds, tmp_path):
    """``python -m pool verify CONFIG --json REPORT`` (in process), output discarded."""
    benchmark.group = f"{arch} verify"
    report = tmp_path / "report.json"
    codes: list[int] = []
    seconds, n = benchlib.time_it(benchmark, lambda: codes.append(run_verify(verify_config, report)),
                                  rounds=rounds["slow"])
    assert set(codes) == {0}
    data = json.loads(report.read_text())
    assert data["summary"]["models_passed"] == 1 + benchlib.N_FINETUNED
    # the same norms as the hand loop computes
    hand = hand_loop(verify_config)
    for entry in data["entries"]:
        if entry["section"] == "models" and entry["name"] != "_pretrained_":
            assert entry["task_vector"]["l2_norm"] == pytest.approx(hand[entry["name"]], rel=1e-9)
    steps = {step: sum((e["timings"][step] or 0.0) for e in data["entries"])
             for step in ("load_s", "weights_s", "forward_s", "task_vector_s")}
    benchmark.extra_info.update({"arch": arch, "role": "ours", "median_s": seconds, "rounds": n,
                                 "last_run_steps_s": steps})
    benchlib.record(arch, "verify", seconds, rounds=n, role="ours", steps=steps)


def _subprocess_verify(args: list[str], cwd: Path) -> None:
    import subprocess

    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_verify_processes(benchmark, arch, verify_config, rounds, processes, tmp_path):
    """Wall time of the whole command (start-up included) at 1 process and under
    ``torchrun --standalone --nproc-per-node 2`` (torchrun gives each rank one thread)."""
    import sys

    benchmark.group = f"{arch} verify processes"
    report = tmp_path / "report.json"
    if processes == 1:
        args = [sys.executable, "-m", "pool", "verify", str(verify_config), "--json", str(report)]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        args = [torchrun, "--standalone", "--nproc-per-node", str(processes), "-m", "pool", "verify",
                str(verify_config), "--json", str(report)]
    seconds, n = benchlib.time_it(benchmark, lambda: _subprocess_verify(args, tmp_path),
                                  rounds=max(1, rounds["slow"] // 2), warmup=0)
    data = json.loads(report.read_text())
    assert data["ok"] and len(data["entries"]) == 2 * benchlib.N_FINETUNED + 1
    benchmark.extra_info.update({"arch": arch, "processes": processes, "median_s": seconds, "rounds": n})
    benchlib.record(arch, f"verify_{processes}proc", seconds, rounds=n, role="ours" if processes > 1 else "baseline")

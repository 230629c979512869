"""``pool verify`` over a real-size pool, beside a hand-written loop doing the same work.

The pool (issue 23's): the cached ViT-B-32 (or ``$POOL_BENCH_ARCHS``) zip pickle as
``_pretrained_``, 4 fine-tuned zip pickles (``benchlib.N_FINETUNED``, at most `VERIFY_MODELS`) and
`VERIFY_HEADS` classification heads paired with the first fine-tuned ones. The baseline is what a
careful user would write by hand to check the same things: for each model ``ImageEncoder.load(path)``,
one forward of a 2-image batch, the task vector's L2 norm against ``_pretrained_`` (per tensor,
float64 accumulation, as verify does); for each head ``ClassificationHead.load(path)`` and its
logits on that encoder's features. Ours: the command in process (its default integrity setting),
and the Python API verify runs (`pool.verify.prepare_pool` + `verify_pool`) with the integrity
pass on and off. Target (issue 11): verify costs at most 1.5x the hand loop, measured in the same
run. No timing thresholds here.
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

from pool import synth
from pool.arch import arch_for_name
from pool.cli import main
from pool.modeling import ClassificationHead, ImageEncoder
from pool.verify import prepare_pool, verify_pool

HEAD_CLASSES = (196, 47, 10, 43, 10, 45, 397, 10)
#: issue 23's pool: _pretrained_ + 4 fine-tuned encoders + 3 heads
VERIFY_MODELS = 4
VERIFY_HEADS = 3


def _size(arch: str) -> int:
    return arch_for_name(arch).image_size


def _sizes() -> tuple[int, int]:
    models = min(VERIFY_MODELS, benchlib.N_FINETUNED)
    return models, min(VERIFY_HEADS, models)


@pytest.fixture(scope="session")
def verify_config(arch, checkpoints, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"verify-{arch}")
    embed = arch_for_name(arch).embed_dim
    n_models, n_heads = _sizes()
    models = {"_pretrained_": str(checkpoints["zip"])}
    heads = {}
    for i in range(n_models):
        models[f"task{i}"] = str(checkpoints[f"finetuned_{i}"])
    for i in range(n_heads):
        head = synth.make_original_head(HEAD_CLASSES[i % len(HEAD_CLASSES)], embed, seed=i)
        heads[f"task{i}"] = str(synth.save_module(head, root / f"head_task{i}.pt", "zip"))
    config = root / "pool.yaml"
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads}), config)
    return config


def hand_loop(config: Path, size: int = 224) -> dict[str, float]:
    """What verify checks, written by hand from the paths: loads, forwards, task-vector norms, heads' logits."""
    paths = OmegaConf.to_container(OmegaConf.load(config))
    models, heads = dict(paths["models"]), dict(paths["classification_heads"])
    norms = {}
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pretrained = ImageEncoder.load(models.pop("_pretrained_")).eval()
        pretrained(images)
        base = {k: v.detach() for k, v in pretrained.state_dict().items()}
        del pretrained
        for name, path in models.items():
            encoder = ImageEncoder.load(path).eval()
            features = encoder(images)
            total = 0.0
            for key, value in encoder.state_dict().items():
                if value.is_floating_point():
                    total += float(torch.linalg.vector_norm(value - base[key], dtype=torch.float64)) ** 2
            norms[name] = math.sqrt(total)
            if name in heads:
                ClassificationHead.load(heads.pop(name))(features)
            del encoder
        assert not heads, f"heads without a model: {sorted(heads)}"
    return norms


def run_verify(config: Path, report: Path) -> int:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return main(["verify", str(config), "--json", str(report)])


def _check_norms(entries: list[dict], hand: dict[str, float]) -> None:
    """verify's task-vector norms are the hand loop's."""
    for entry in entries:
        if entry["section"] == "models" and entry["name"] != "_pretrained_":
            assert entry["task_vector"]["l2_norm"] == pytest.approx(hand[entry["name"]], rel=1e-9)


def _steps(entries: list[dict]) -> dict[str, float]:
    return {step: sum((e["timings"][step] or 0.0) for e in entries)
            for step in ("load_s", "weights_s", "forward_s", "task_vector_s")}


def test_verify_hand_loop(benchmark, arch, verify_config, rounds):
    """Baseline: the hand-written loop over the same pool."""
    benchmark.group = f"{arch} verify"
    seconds, n = benchlib.time_it(benchmark, lambda: hand_loop(verify_config, _size(arch)), rounds=rounds["slow"])
    n_models, n_heads = _sizes()
    benchmark.extra_info.update({"arch": arch, "role": "baseline", "median_s": seconds, "rounds": n,
                                 "models": 1 + n_models, "heads": n_heads})
    benchlib.record(arch, "hand_loop", seconds, rounds=n, role="baseline")


def test_verify_cli(benchmark, arch, verify_config, rounds, tmp_path):
    """``python -m pool verify CONFIG --json REPORT`` (in process), output discarded; the command's
    default integrity setting (recorded as ``integrity``)."""
    benchmark.group = f"{arch} verify"
    report = tmp_path / "report.json"
    codes: list[int] = []
    seconds, n = benchlib.time_it(benchmark, lambda: codes.append(run_verify(verify_config, report)),
                                  rounds=rounds["slow"])
    assert set(codes) == {0}
    data = json.loads(report.read_text())
    assert data["summary"]["models_passed"] == 1 + _sizes()[0]
    _check_norms(data["entries"], hand_loop(verify_config, _size(arch)))
    integrity = data.get("integrity_checked")
    steps = _steps(data["entries"])
    benchmark.extra_info.update({"arch": arch, "role": "ours", "median_s": seconds, "rounds": n,
                                 "last_run_steps_s": steps, "integrity": integrity})
    benchlib.record(arch, "verify", seconds, rounds=n, role="ours", steps=steps, integrity=integrity)


@pytest.mark.parametrize("integrity", [True, False], ids=["integrity", "no_integrity"])
def test_verify_api(benchmark, arch, verify_config, rounds, integrity):
    """The Python API ``verify`` runs: ``prepare_pool(config)`` + ``verify_pool(...)``, with the
    integrity pass (zip CRC32s, safetensors headers) on and off, whatever the command's default."""
    benchmark.group = f"{arch} verify"
    reports = []

    def run() -> None:
        pool, models, heads = prepare_pool(verify_config)
        reports.append(verify_pool(pool, models, heads, config_label=str(verify_config), integrity=integrity))

    seconds, n = benchlib.time_it(benchmark, run, rounds=rounds["slow"])
    report = reports[-1]
    assert all(e.ok for e in report.entries), [e.label for e in report.entries if not e.ok]
    assert len(report.entries) == 1 + sum(_sizes())
    _check_norms(report.as_dict()["entries"], hand_loop(verify_config, _size(arch)))
    label = "verify_integrity" if integrity else "verify_no_integrity"
    benchmark.extra_info.update({"arch": arch, "role": "ours", "median_s": seconds, "rounds": n,
                                 "integrity": integrity})
    benchlib.record(arch, label, seconds, rounds=n, role="ours", integrity=integrity)


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
    assert data["ok"] and len(data["entries"]) == 1 + sum(_sizes())
    benchmark.extra_info.update({"arch": arch, "processes": processes, "median_s": seconds, "rounds": n})
    benchlib.record(arch, f"verify_{processes}proc", seconds, rounds=n, role="ours" if processes > 1 else "baseline")

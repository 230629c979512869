"""Issue 21: the default read puts tensors in private memory; what that costs, warm and cold.

A private copy costs at least one read of the bytes into fresh memory: that is the floor here
(``readinto`` a new buffer the size of the file). Beside it, in the same run and on the same
state-dict file: ``torch.load(weights_only=True)`` (copying, its default), ``pool``'s default
``load_state_dict``, and the explicit opt-in ``mmap=True`` with every page touched once (mapping
alone defers the reading to first use). The zip pickle of a whole encoder is read by default too.
Warm: the page cache holds the file; cold: emptied before each round (`benchlib.drop_page_cache`).
No timing thresholds: a benchmark fails only when a read does.
"""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
import torch

from pool.checkpoint import load_state_dict


def _fresh_read(path: Path) -> torch.Tensor:
    buffer = torch.empty(path.stat().st_size, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(buffer.numpy()), 0
        while done < len(view):
            done += f.readinto(view[done:])
    return buffer


def _touched(state: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor: a mapped read's deferred cost, paid."""
    total = 0
    for t in state.values():
        flat = t.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::4096].sum()) if flat.numel() else 0
    return total


CASES = {
    "fresh_read": lambda paths: _fresh_read(paths["state_dict"]),
    "torch_load": lambda paths: torch.load(paths["state_dict"], weights_only=True),
    "ours": lambda paths: load_state_dict(paths["state_dict"]),
    "ours_mmap_touched": lambda paths: _touched(load_state_dict(paths["state_dict"], mmap=True)),
    "ours_zip": lambda paths: load_state_dict(paths["zip"]),
}


@pytest.fixture(scope="session")
def copy_checkpoints(arch: str) -> dict[str, Path]:
    return benchlib.ensure_checkpoints(arch, finetuned=0)


@pytest.mark.parametrize("cache", list(benchlib.TTFF_CACHES))
@pytest.mark.parametrize("case", list(CASES))
def test_private_copy(benchmark, arch, copy_checkpoints, rounds, case, cache):
    run = CASES[case]
    path = copy_checkpoints["zip" if case == "ours_zip" else "state_dict"]
    run(copy_checkpoints)  # fails loudly (not as a figure) if the read is broken
    benchmark.group = f"{arch} state dict into private memory ({cache} page cache)"
    n_rounds = rounds["cold"] if cache == "cold" else rounds["slow"]
    seconds, n, extra = benchlib.time_with_page_cache(benchmark, lambda: run(copy_checkpoints), cache=cache,
                                                      files=lambda: [path], rounds=n_rounds)
    benchlib.record_benchmark(benchmark, arch, f"copy_{case}_{cache}", "baseline" if case in ("fresh_read", "torch_load")
                              else "ours", path, seconds, n, page_cache=cache, **extra)

"""Issue 23: what the integrity pass (``pool.integrity.check_integrity``, run by ``verify`` before
each load) costs, beside reading the same bytes, in the same run, warm page cache.

``check_integrity`` of the ViT-B-32 zip pickle recomputes every member's CRC32; of the safetensors
file it checks the header and that the tensors tile the data section. Baselines on the same file:
reading every byte in 1 MiB chunks into one reused buffer (what any pass over the bytes costs at
least), and for the zip the same read with ``zlib.crc32`` over each chunk (the floor of a CRC pass).
The file is read once before the timing, so the page cache is warm. No timing thresholds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import benchlib
import pytest

from pool.integrity import check_integrity

CHUNK = 1 << 20


def read_chunks(path: Path, crc: bool = False) -> int:
    """Every byte of ``path`` in 1 MiB chunks (``readinto`` one buffer); with ``crc``, their CRC32."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    value = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if crc:
                value = zlib.crc32(view[:n], value)
    return value


CASES: dict[str, tuple[str, Callable[[Path], object]]] = {
    "read_chunks": ("baseline", read_chunks),
    "read_crc32": ("baseline", lambda path: read_chunks(path, crc=True)),
    "integrity": ("ours", check_integrity),
}


@pytest.fixture(scope="session")
def integrity_checkpoints(arch: str) -> dict[str, Path]:
    return benchlib.ensure_checkpoints(arch, finetuned=0)


#: baselines first (file order), then ours; a safetensors file has no CRC32s to compare with
PARAMS = [("read_chunks", "zip"), ("read_crc32", "zip"), ("integrity", "zip"),
          ("read_chunks", "safetensors"), ("integrity", "safetensors")]


@pytest.mark.parametrize(("case", "form"), PARAMS)
def test_integrity(benchmark, arch, integrity_checkpoints, rounds, case, form):
    """``check_integrity(path)`` and its baselines, on the zip pickle and the safetensors file."""
    path = integrity_checkpoints[form]
    role, fn = CASES[case]
    result = fn(path)  # fails loudly (not as a figure) if the check fails; reads the file: warm cache
    if case == "integrity":
        assert result.checked, result  # type: ignore[attr-defined]
    read_chunks(path)
    benchmark.group = f"{arch} integrity pass vs reading the bytes (warm page cache)"
    seconds, n = benchlib.time_it(benchmark, lambda: fn(path), rounds=rounds["slow"])
    benchlib.record_benchmark(benchmark, arch, f"{case}_{form}", role, path, seconds, n, form=form,
                              page_cache="warm")

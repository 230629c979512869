"""Time to first features (issue 15): ``ImageEncoder.load(path)`` plus one forward, warm and cold.

The load benchmarks (``test_load_cpu.py``) time a ready encoder with a warm page cache; with mmap
that defers reading the weights to the first forward. What a user waits for is the first features,
so this times load + ``eval()`` + one forward of a small batch (``$POOL_BENCH_TTFF_BATCH`` images,
default 2, random, made once outside the timing, under ``torch.no_grad()``) for every form
benchlib synthesizes, with a warm page cache and with a cold one. The baseline, in the same run, is
the usual user path: ``torch.load(state_dict_file, weights_only=True)`` (no mmap),
``open_clip.create_model("<arch>-quickgelu", pretrained=None)``, the ``model.`` prefix stripped,
``load_state_dict(strict=False)`` (the file has no text transformer; every key of the file must be
taken and no ``visual.`` key left missing), ``eval()``, ``encode_image``.

Cold: before each cold round (outside the timed region) ``sync; echo 3 > /proc/sys/vm/drop_caches``
where allowed, else ``posix_fadvise(DONTNEED)`` on the files read; skipped when neither works.
The method and the checkpoint's resident fraction just before each timed round (``mincore``) go
into ``extra_info``. Everything is imported, and every path run once, before any timing.

The plain pickle is also timed through the conversion cache (``pool.cache``) (a hit: the cache directory is filled once per architecture
before timing; the cold variant empties the page cache, not the cache directory).

No timing thresholds: a benchmark fails only when loading (or the features check) fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import open_clip
import pytest
import torch

from pool.arch import arch_for_name
from pool.modeling import ImageEncoder

FORMS = list(benchlib.TTFF_FORMS)
CACHES = list(benchlib.TTFF_CACHES)
CACHE_FORM = "pickle_cache"
#: feature agreement between ours and the baseline (same weights, same activation)
TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}
#: the baseline's features, per architecture, to check ours against (same weights)
REFERENCE: dict[str, torch.Tensor] = {}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ttff_checkpoints(arch: str) -> dict[str, Path]:
    """Every form for ``arch``, without fine-tuned copies (ViT-L-14: ~1.4 GB a form)."""
    return benchlib.ensure_checkpoints(arch, finetuned=0)


@pytest.fixture(scope="session")
def ttff_images(arch: str) -> torch.Tensor:
    """``$POOL_BENCH_TTFF_BATCH`` (default 2) random images at the architecture's size, made once."""
    batch = int(os.environ.get("POOL_BENCH_TTFF_BATCH", "2"))
    size = arch_for_name(arch).image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def conversion_cache(arch: str, ttff_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A conversion-cache directory holding the plain pickle's entry (filled by one load, a miss)."""
    root = tmp_path_factory.mktemp(f"ttff-cache-{arch}")
    ImageEncoder.load(ttff_checkpoints["pickle"], cache_dir=str(root))
    if not any(p.is_file() for p in root.rglob("*")):
        pytest.fail(f"the conversion cache wrote nothing under {root}")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # ViT-L-14: 1.4 GB; nothing else uses it


def _rounds(rounds: dict[str, int], arch: str, cache: str) -> int:
    """Few rounds for a cold cache (``$POOL_BENCH_COLD_ROUNDS``), at most 3 for ViT-L-14 and wider."""
    n = rounds["cold"] if cache == "cold" else rounds["slow"]
    return min(n, 3) if arch_for_name(arch).width >= 1024 else n


def _prepare(benchmark: Any, run: Callable[[], None], cache: str, files: list[Path]) -> None:
    """The untimed first run (the warm-up: imports, first-call caches, the checks), or, for a warm
    round of ``--benchmark-disable`` (one timed run that is its own check), reading the files once."""
    if cache == "warm" and getattr(benchmark, "disabled", False):
        for path in files:
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    else:
        run()


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- the baseline: the usual user path -------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHES)
def test_ttff_baseline(benchmark, arch, ttff_checkpoints, ttff_images, rounds, cache):
    """``torch.load`` (no mmap) + ``open_clip.create_model`` + ``load_state_dict`` + ``encode_image``."""
    path = ttff_checkpoints["state_dict"]
    name = f"{arch}-quickgelu"  # task_vectors' encoders are OpenAI CLIP: QuickGELU
    out: dict[str, Any] = {}

    def run() -> None:
        sd = torch.load(path, weights_only=True)
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        model = open_clip.create_model(name, pretrained=None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        model.eval()
        with torch.no_grad():
            out["features"] = model.encode_image(ttff_images)
        out["keys"] = (len(sd), list(missing), list(unexpected))

    def check() -> list[str]:  # every key of the file taken, nothing visual left missing
        n_keys, missing, unexpected = out["keys"]
        assert not unexpected, f"state dict keys open_clip's {name} does not have: {unexpected[:5]}"
        assert not [k for k in missing if k.startswith("visual.")], f"visual keys not loaded: {missing[:5]}"
        assert all(k.startswith("transformer.") for k in missing), f"missing beyond the text tower: {missing[:5]}"
        assert n_keys > 100 and out["features"].shape == (len(ttff_images), arch_for_name(arch).embed_dim)
        REFERENCE[arch] = out["features"]
        return missing

    _prepare(benchmark, run, cache, [path])
    if out:
        check()  # before spending rounds on it
    benchmark.group = f"{arch} time to first features ({cache} page cache)"
    seconds, n, extra = benchlib.time_with_page_cache(benchmark, run, cache=cache, files=lambda: [path], rounds=_rounds(rounds, arch, cache))
    missing = check()
    benchlib.record_benchmark(benchmark, arch, benchlib.ttff_label(benchlib.TTFF_BASELINE, cache), "baseline", path, seconds, n,
            form=benchlib.TTFF_BASELINE, page_cache=cache, batch=len(ttff_images), model=name,
            missing_text_keys=len(missing), **extra)


# -- ours ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("form", FORMS)
def test_ttff_ours(benchmark, request, arch, ttff_checkpoints, ttff_images, rounds, form, cache):
    """``ImageEncoder.load(path)`` + ``eval()`` + one forward, for each form (and a conversion-cache hit)."""
    kwargs: dict[str, Any] = {}
    if form == CACHE_FORM:
        path = ttff_checkpoints["pickle"]
        root = request.getfixturevalue("conversion_cache")
        kwargs["cache_dir"] = str(root)

        def files() -> list[Path]:
            return [path, *_cache_files(root)]
    else:
        path = ttff_checkpoints[form]

        def files() -> list[Path]:
            return [path]
    out: dict[str, torch.Tensor] = {}

    def run() -> None:
        encoder = ImageEncoder.load(path, **kwargs).eval()
        with torch.no_grad():
            out["features"] = encoder(ttff_images)

    def check() -> None:
        assert out["features"].shape == (len(ttff_images), arch_for_name(arch).embed_dim)
        reference = REFERENCE.get(arch)
        if reference is not None:  # the baseline ran: the same weights must give the same features
            torch.testing.assert_close(out["features"], reference, **TOLERANCE)

    def entries() -> dict[str, tuple[int, int]]:  # the cache's files; a miss would rewrite the entry
        return {str(f): (f.stat().st_ino, f.stat().st_mtime_ns) for f in files()[1:]}

    _prepare(benchmark, run, cache, files())  # fails loudly (not as a figure) if the form is broken
    if out:
        check()
    before = entries()
    benchmark.group = f"{arch} time to first features ({cache} page cache)"
    seconds, n, extra = benchlib.time_with_page_cache(benchmark, run, cache=cache, files=files, rounds=_rounds(rounds, arch, cache))
    check()
    assert entries() == before, "the conversion cache rewrote its entry: a round was a miss, not a hit"
    label = benchlib.ttff_label(form, cache)
    benchlib.record_benchmark(benchmark, arch, label, "ours", path, seconds, n, form=form, page_cache=cache,
            batch=len(ttff_images), **extra)
    base = benchlib.RESULTS.get(arch, {}).get(benchlib.ttff_label(benchlib.TTFF_BASELINE, cache))
    if base and base["seconds"] > 0:
        benchmark.extra_info["ratio_vs_baseline"] = round(seconds / base["seconds"], 3)

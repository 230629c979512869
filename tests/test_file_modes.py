"""What pool writes is readable as any file the user writes (issue 23, fix 5), and ``convert``
writes the format its destination's name asks for, as ``save_model`` does (fix 6).

Modes: a new file gets ``0666 & ~umask`` (a new folder ``0777 & ~umask``), as ``open(path, "w")``
and ``mkdir`` give; a file replaced keeps its own mode, as ``cp`` does. The umask is process-wide,
so each case runs in a forked child (`helpers.run_isolated`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import run_isolated

from pool import ConfigError, ImageEncoder, OpenCLIPVisionModelPool, cache_layout, read_checkpoint, synth
from pool.cli import main
from pool.convert import convert_file, convert_to_hf, convert_tree, plan_tree


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_all(folder: Path, umask: int) -> dict[str, int]:
    """In the child: under ``umask``, every writer's files, and their modes."""
    os.umask(umask)
    source = synth.save_module(synth.make_original_encoder(seed=3), folder / "enc.zip.pt", "zip")
    head = synth.save_module(synth.make_original_head(4, synth.TINY.embed_dim, seed=1), folder / "head.pt", "zip")
    out = folder / "out"
    out.mkdir()
    assert main(["convert", str(source), str(out / "enc.safetensors")]) == 0
    assert main(["convert", str(source), str(out / "enc.pt")]) == 0
    convert_file(head, out / "head.safetensors")
    OpenCLIPVisionModelPool(models={"x": str(source)}).save_model(ImageEncoder.load(source), out / "saved.safetensors")
    OpenCLIPVisionModelPool(models={"x": str(source)}).save_model(ImageEncoder.load(source), out / "saved.pt")
    convert_to_hf(source, out / "hf")
    tree = folder / "tree" / "tiny"
    (tree / "Cars").mkdir(parents=True)
    synth.save_module(synth.make_original_encoder(seed=3), tree / "zeroshot.pt", "zip")
    synth.save_module(synth.make_original_encoder(seed=4), tree / "Cars" / "finetuned.pt", "zip")
    _, configs = convert_tree(plan_tree(folder / "tree"))
    written = [*out.iterdir(), *(out / "hf").iterdir(), tree / "zeroshot.safetensors",
               tree / "Cars" / "finetuned.safetensors", *configs]
    return {str(p.relative_to(folder)): _mode(p) for p in written}


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                           (0o002, 0o664, 0o775)])
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, file_mode, folder_mode):
    report = run_isolated(_write_all, tmp_path, umask, timeout=300)
    assert report.kind == "returned", str(report)
    modes = report.value
    assert {"out/enc.safetensors", "out/enc.pt", "out/head.safetensors", "out/saved.safetensors", "out/saved.pt",
            "out/hf", "out/hf/model.safetensors", "out/hf/config.json", "out/hf/preprocessor_config.json",
            "tree/pool.safetensors.yaml", "tree/tiny/zeroshot.safetensors"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (folder_mode if name == "out/hf" else file_mode)}
    assert not wrong, (oct(file_mode), wrong)


def _replace_keeps_mode(folder: Path) -> dict[str, int]:
    """In the child (umask 022): files that exist with their own modes, replaced by each writer."""
    os.umask(0o022)
    source = synth.save_module(synth.make_original_encoder(seed=3), folder / "enc.zip.pt", "zip")
    encoder = ImageEncoder.load(source)
    targets = {"convert": folder / "enc.safetensors", "save_model": folder / "saved.pt",
               "hf": folder / "hf" / "model.safetensors"}
    convert_to_hf(source, folder / "hf")
    for target in targets.values():
        if not target.exists():
            target.write_bytes(b"old")
        os.chmod(target, 0o640)
    convert_file(source, targets["convert"], force=True)
    OpenCLIPVisionModelPool(models={"x": str(source)}).save_model(encoder, targets["save_model"])
    os.chmod(folder / "hf", 0o750)
    convert_to_hf(source, folder / "hf", force=True)
    return {**{name: _mode(target) for name, target in targets.items()}, "hf folder": _mode(folder / "hf")}


def test_a_replaced_file_keeps_its_mode(tmp_path):
    report = run_isolated(_replace_keeps_mode, tmp_path, timeout=300)
    assert report.kind == "returned", str(report)
    assert report.value == {"convert": 0o640, "save_model": 0o640, "hf": 0o640, "hf folder": 0o750}


def test_the_conversion_cache_entries_stay_private(tmp_path):
    def cached(folder: Path) -> list[int]:
        os.umask(0o022)
        source = synth.save_module(synth.make_original_encoder(seed=3), folder / "enc.legacy.pt", "legacy")
        cache = folder / "cache"  # the cache copies legacy and plain pickles
        cache_layout.RACY_SECONDS = 0  # (in the child) a file changed seconds ago is cached now, not later
        read_checkpoint(source, cache_dir=cache)
        return [_mode(p) for p in cache.rglob("*.safetensors")]

    report = run_isolated(cached, tmp_path, timeout=300)
    assert report.kind == "returned", str(report)
    assert report.value and all(mode == 0o600 for mode in report.value), [oct(m) for m in report.value]


# -- fix 6: convert SRC out.pt writes what torch.load reads ----------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_convert_to_a_torch_name_writes_a_torch_state_dict(tmp_path, write_encoder, suffix):
    source, _ = write_encoder("legacy")
    destination = tmp_path / f"enc{suffix}"
    assert main(["convert", str(source), str(destination)]) == 0
    loaded = torch.load(destination, weights_only=True, map_location="cpu")
    want = ImageEncoder.load(source).state_dict()
    assert set(loaded) == set(want)
    assert all(torch.equal(loaded[k], want[k]) and loaded[k].dtype == want[k].dtype for k in want)
    assert read_checkpoint(destination).container != "safetensors"
    # the same bytes as save_model writes for that name, loaded back by pool alike
    saved = OpenCLIPVisionModelPool(models={}).save_model(ImageEncoder.load(source), tmp_path / f"saved{suffix}")
    assert read_checkpoint(saved).container == read_checkpoint(destination).container
    assert_same = ImageEncoder.load(destination).state_dict()
    assert all(torch.equal(assert_same[k], want[k]) for k in want)


def test_convert_to_safetensors_and_other_names_writes_safetensors(tmp_path, write_encoder):
    source, _ = write_encoder("zip")
    for name in ("enc.safetensors", "enc.weights"):
        convert_file(source, tmp_path / name)
        assert read_checkpoint(tmp_path / name).container == "safetensors"


def test_convert_to_a_torch_name_refuses_what_it_would_lose(tmp_path, write_head):
    source, _ = write_head("zip", normalize=False)
    with pytest.raises(ConfigError, match=r"normalize=False.*\.safetensors"):
        convert_file(source, tmp_path / "head.pt")
    assert not (tmp_path / "head.pt").exists()
    assert main(["convert", str(source), str(tmp_path / "head.pt")]) == 2
    convert_file(source, tmp_path / "head.safetensors")  # safetensors records it

"""The conversion cache (pool.cache): served only while the source is unchanged, never stale, damaged
entries rebuilt, nothing but tensors and metadata stored, opt-in through the environment variable,
the pool's ``cache_dir`` key or ``cache_dir=``; and ``python -m pool cache info|clear``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import synth
from pool.cache import CACHE_ENV, CheckpointCache, resolve_cache_dir
from pool.checkpoint import read_checkpoint
from pool.cli import main
from pool.errors import ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from pool.modeling import ClassificationHead, ImageEncoder
from pool.modelpool import OpenCLIPVisionModelPool

PICKLED = synth.ENCODER_CONTAINERS  # zip, legacy, pickle
CACHED = ("legacy", "pickle")  # the containers the cache copies (pool.cache.CACHEABLE)


@pytest.fixture(autouse=True)
def settled(monkeypatch):
    """Files written by a test are seconds old at most: let the cache take them (the rule that it
    does not is tested on its own, below)."""
    from pool import cache_layout

    monkeypatch.setattr(cache_layout, "RACY_SECONDS", 0.0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny encoder and head in every pickled container, plus a safetensors copy: read-only."""
    root = tmp_path_factory.mktemp("cache_sources")
    encoder = synth.make_original_encoder(seed=3)
    head = synth.make_original_head(5, synth.TINY.embed_dim, seed=4, normalize=False)
    files = {}
    for container in PICKLED:
        files["encoder", container] = synth.save_module(encoder, root / f"encoder.{container}.pt", container)
        files["head", container] = synth.save_module(head, root / f"head.{container}.pt", container)
    files["encoder", "safetensors"] = synth.save_state_dict(encoder.state_dict(), root / "encoder.safetensors",
                                                            "safetensors")
    return files


def _same(a, b) -> None:
    """Two checkpoints hold the same tensors (bit for bit) and the same records."""
    assert_same_tensors(a, b)
    assert (a.container, a.root_type, a.wrapper, a.metadata) == (b.container, b.root_type, b.wrapper, b.metadata)
    assert a.modules == b.modules
    assert a.globals == b.globals


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "v1").glob("*.safetensors")) if (cache_dir / "v1").is_dir() else []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# -- served from the cache, equal to the source -----------------------------------------------------
@pytest.mark.parametrize("kind", ["encoder", "head"])
@pytest.mark.parametrize("container", CACHED)
def test_second_read_comes_from_the_cache_and_equals_the_source(sources, tmp_path, kind, container):
    path = sources[kind, container]
    direct = read_checkpoint(path, cache_dir=False)
    first = read_checkpoint(path, cache_dir=tmp_path)
    second = read_checkpoint(path, cache_dir=tmp_path)
    assert len(_entries(tmp_path)) == 1
    assert direct.cache_entry is None
    assert first.cache_entry == second.cache_entry == _entries(tmp_path)[0]
    assert second.path == path  # errors and labels still name the source
    _same(first, direct)
    _same(second, direct)


def test_cached_encoder_and_head_compute_what_the_source_does(sources, tmp_path):
    images = torch.randn(2, 3, synth.TINY.image_size, synth.TINY.image_size)
    for container in CACHED:
        direct = ImageEncoder.load(sources["encoder", container], cache_dir=False)
        for _ in range(2):  # the miss and the hit
            cached = ImageEncoder.load(sources["encoder", container], cache_dir=tmp_path)
            assert cached.arch == direct.arch
            assert torch.equal(cached(images), direct(images))
        head = ClassificationHead.load(sources["head", container], cache_dir=tmp_path)
        head_direct = ClassificationHead.load(sources["head", container], cache_dir=False)
        assert head.normalize is head_direct.normalize is False  # the pickled flag survives the cache
        features = direct(images)
        assert torch.equal(head(features), head_direct(features))


def test_cached_tensors_are_mapped_from_the_entry(sources, tmp_path):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    ckpt = read_checkpoint(path, cache_dir=tmp_path)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    assert str(ckpt.cache_entry) in maps.read_text()


def test_mmap_false_and_dtype_still_apply(sources, tmp_path):
    path = sources["encoder", "legacy"]
    read_checkpoint(path, cache_dir=tmp_path)
    ckpt = read_checkpoint(path, cache_dir=tmp_path, mmap=False)
    _same(ckpt, read_checkpoint(path, cache_dir=False))
    encoder = ImageEncoder.load(path, cache_dir=tmp_path, dtype="bf16")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("container", ["safetensors", "zip"])
def test_safetensors_and_zip_sources_are_not_copied(sources, tmp_path, container):
    """safetensors is what the cache would write; a zip pickle is memory-mapped with a short pickle
    already (a copy would double its disk for ~10 ms a load)."""
    ckpt = read_checkpoint(sources["encoder", container], cache_dir=tmp_path)
    assert ckpt.cache_entry is None
    assert _entries(tmp_path) == []


def test_transformers_folders_are_not_copied(tmp_path):
    from pool.hf_export import write_hf_folder

    encoder = ImageEncoder.from_state_dict(synth.make_original_encoder(seed=1).state_dict())
    folder = write_hf_folder(encoder, tmp_path / "hf")
    ckpt = read_checkpoint(folder, cache_dir=tmp_path / "cache")
    assert ckpt.cache_entry is None and _entries(tmp_path / "cache") == []


def test_reads_the_cache_cannot_serve_bypass_it(sources, tmp_path):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path, refuse_unsafe=False)  # inspect's read: globals listed as read
    read_checkpoint(path, cache_dir=tmp_path, map_location={"cpu": "cpu"})  # saved locations are not kept
    read_checkpoint(path, cache_dir=tmp_path, map_location="meta")  # no data needed at all
    assert not tmp_path.joinpath("v1").exists()


# -- opt-in: environment, keyword, pool key ------------------------------------------------------------
def test_environment_variable_turns_it_on_and_false_turns_it_off(sources, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    ImageEncoder.load(sources["encoder", "legacy"], cache_dir=False)
    assert _entries(tmp_path / "env") == []
    ImageEncoder.load(sources["encoder", "legacy"])
    assert len(_entries(tmp_path / "env")) == 1
    ImageEncoder.load(sources["encoder", "legacy"], cache_dir=tmp_path / "kw")  # the keyword wins
    assert len(_entries(tmp_path / "kw")) == 1
    monkeypatch.delenv(CACHE_ENV)
    assert resolve_cache_dir() is None


def test_no_cache_without_opting_in(sources, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert read_checkpoint(sources["encoder", "pickle"]).cache_entry is None
    assert list(tmp_path.iterdir()) == []


def test_pool_cache_dir_key(sources, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    config = {"cache_dir": str(tmp_path / "c"), "models": {"a": str(sources["encoder", "legacy"])},
              "classification_heads": {"a": str(sources["head", "pickle"])}}
    pool = OpenCLIPVisionModelPool.from_config(config)
    pool.load_model("a")
    pool.load_classification_head("a")
    assert len(_entries(tmp_path / "c")) == 2
    assert pool.read_entry(pool.entry("a")).cache_entry is not None
    pool.to_yaml(tmp_path / "pool.yaml")
    assert OpenCLIPVisionModelPool.from_yaml(tmp_path / "pool.yaml").cache_dir == str(tmp_path / "c")
    off = OpenCLIPVisionModelPool.from_config({**config, "cache_dir": False})
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert off.read_entry(off.entry("a")).cache_entry is None  # false wins over the environment
    assert _entries(tmp_path / "env") == []


@pytest.mark.parametrize("bad", [3, ["a"], {"b": 1}])
def test_bad_cache_dir_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="cache_dir"):
        OpenCLIPVisionModelPool(models={}, cache_dir=bad)


def test_near_miss_of_cache_dir_is_refused():
    with pytest.raises(ConfigError, match="cache_dir"):
        OpenCLIPVisionModelPool.from_config({"models": {}, "cache_dirs": "/tmp/x"})


# -- never stale -----------------------------------------------------------------------------------------
def _tensor_ranges(path: Path) -> list[tuple[int, int]]:
    """Where the file's tensor bytes lie, found by their contents (storage keys, and so offsets,
    differ from one run to the next); largest first. Changing bytes in there changes weights only."""
    data = path.read_bytes()
    ranges = []
    for tensor in read_checkpoint(path, cache_dir=False).state_dict.values():
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        start = data.find(raw[:256]) if len(raw) >= 1024 else -1
        if start >= 0 and data[start:start + len(raw)] == raw:
            ranges.append((start, start + len(raw)))
    return sorted(ranges, key=lambda r: r[0] - r[1])


def _rewrite(path: Path, seed: int, offset: int | None = None) -> None:
    """Change 64 bytes of tensor data in place (same size, same inode), then put the mtime back;
    at ``offset``, else in the middle of one of the largest tensors (by ``seed``)."""
    before = path.stat()
    if offset is None:
        ranges = _tensor_ranges(path)[:4]
        start, stop = ranges[seed % len(ranges)]
        offset = (start + stop) // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(64)
        f.seek(offset)
        f.write(bytes(b ^ (0x5A + seed) for b in data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("container", CACHED)
def test_in_place_rewrite_with_the_same_mtime_is_not_served(sources, tmp_path, container):
    path = _copy(sources["encoder", container], tmp_path / f"model.{container}.pt")
    read_checkpoint(path, cache_dir=tmp_path / "c")
    size = path.stat().st_size
    before = path.stat()
    _rewrite(path, seed=1)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (size, before.st_mtime_ns, before.st_ino)
    direct = read_checkpoint(path, cache_dir=False)
    assert any(not torch.equal(direct.state_dict[k], v) for k, v in read_checkpoint(
        sources["encoder", container], cache_dir=False).state_dict.items())  # the weights did change
    _same(read_checkpoint(path, cache_dir=tmp_path / "c"), direct)
    assert len(_entries(tmp_path / "c")) == 1  # the old entry was replaced, not kept beside


def test_sampled_content_catches_a_change_the_identity_misses(sources, tmp_path, monkeypatch):
    """Where ctime cannot be trusted (it is all the identity has left here), the sampled blocks are
    the second line: a change inside a sampled block is not served."""
    from pool import cache_layout

    path = _copy(sources["encoder", "legacy"], tmp_path / "model.pt")
    read_checkpoint(path, cache_dir=tmp_path / "c")
    identity = cache_layout.identity
    monkeypatch.setattr(cache_layout, "identity", lambda info: {**identity(info), "ctime_ns": 0})
    read_checkpoint(path, cache_dir=tmp_path / "c")  # re-indexed with ctime ignored
    last = path.stat().st_size - 4096
    blocks = [last * i // 15 for i in range(16)]  # where the sampled blocks start
    inside = [b for b in blocks if any(start <= b and b + 64 <= stop for start, stop in _tensor_ranges(path))]
    _rewrite(path, seed=2, offset=inside[len(inside) // 2])  # a sampled block within tensor data
    _same(read_checkpoint(path, cache_dir=tmp_path / "c"), read_checkpoint(path, cache_dir=False))


def test_replaced_file_is_not_served(sources, tmp_path):
    path = _copy(sources["encoder", "pickle"], tmp_path / "model.pt")
    read_checkpoint(path, cache_dir=tmp_path / "c")
    _copy(sources["encoder", "legacy"], tmp_path / "other.pt").replace(path)  # new inode, other container
    ckpt = read_checkpoint(path, cache_dir=tmp_path / "c")
    assert ckpt.container == "legacy" and ckpt.cache_entry is not None
    _same(ckpt, read_checkpoint(path, cache_dir=False))


def test_symlinks_share_the_entry_of_their_target(sources, tmp_path):
    target = _copy(sources["encoder", "pickle"], tmp_path / "model.pt")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    read_checkpoint(target, cache_dir=tmp_path / "c")
    assert read_checkpoint(link, cache_dir=tmp_path / "c").cache_entry is not None
    assert len(_entries(tmp_path / "c")) == 1


@given(steps=st.lists(st.sampled_from(["read", "rewrite", "replace", "touch", "append"]), min_size=1, max_size=6),
       seeds=st.lists(st.integers(0, 3), min_size=6, max_size=6))
@settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_cached_read_always_equals_a_direct_read(tmp_path_factory, steps, seeds):
    """Whatever happens to the source between reads, a cached read equals a direct read."""
    root = tmp_path_factory.mktemp("prop")
    path = root / "model.pt"
    synth.save_module(synth.make_original_encoder(seed=0), path, "legacy")
    for step, seed in zip(steps, seeds, strict=False):
        if step == "rewrite":
            _rewrite(path, seed)
        elif step == "replace":
            synth.save_module(synth.make_original_encoder(seed=seed), root / "tmp.pt", "pickle")
            (root / "tmp.pt").replace(path)
        elif step == "touch":
            os.utime(path)
        elif step == "append":  # a file that grew: a trailing byte our reader ignores or refuses alike
            with open(path, "ab") as f:
                f.write(b"\0")
        try:
            direct = read_checkpoint(path, cache_dir=False)
        except CorruptCheckpointError:
            with pytest.raises(CorruptCheckpointError):
                read_checkpoint(path, cache_dir=root / "c")
            continue
        _same(read_checkpoint(path, cache_dir=root / "c"), direct)


# -- damaged entries are rebuilt --------------------------------------------------------------------------
def _index(cache_dir: Path) -> Path:
    (index,) = (cache_dir / "v1").glob("*.json")
    return index


def _damage_truncate(cache_dir: Path) -> None:
    entry = _entries(cache_dir)[0]
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size // 2)


def _damage_header(cache_dir: Path) -> None:
    entry = _entries(cache_dir)[0]
    with open(entry, "r+b") as f:
        f.seek(8)
        f.write(b"garbage!")


def _damage_delete(cache_dir: Path) -> None:
    _entries(cache_dir)[0].unlink()


def _damage_index(cache_dir: Path) -> None:
    _index(cache_dir).write_text("{not json", encoding="utf-8")


def _damage_index_escape(cache_dir: Path) -> None:
    index = _index(cache_dir)
    data = json.loads(index.read_text(encoding="utf-8"))
    data["entry"] = "../../outside.safetensors"
    index.write_text(json.dumps(data), encoding="utf-8")


def _damage_swap(cache_dir: Path) -> None:
    """Another valid safetensors file (other weights) in the entry's place."""
    entry = _entries(cache_dir)[0]
    other = entry.with_name("other")
    synth.save_state_dict(synth.make_original_encoder(seed=77).state_dict(), other, "safetensors")
    other.replace(entry)


DAMAGE = [_damage_truncate, _damage_header, _damage_delete, _damage_index, _damage_index_escape, _damage_swap]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.removeprefix("_damage_") for d in DAMAGE])
def test_damaged_entry_is_detected_and_rebuilt(sources, tmp_path, damage, caplog):
    path = sources["encoder", "pickle"]
    cache_dir = tmp_path / "c"
    read_checkpoint(path, cache_dir=cache_dir)
    damage(cache_dir)
    assert any(e.status in ("damaged", "orphan") for e in CheckpointCache(cache_dir).entries())
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        ckpt = read_checkpoint(path, cache_dir=cache_dir)
    assert "damaged" in caplog.text or "missing" in caplog.text
    _same(ckpt, read_checkpoint(path, cache_dir=False))
    assert ckpt.cache_entry is not None  # rebuilt and served from the new entry
    assert [e.status for e in CheckpointCache(cache_dir).entries()] == ["fresh"]
    assert not (tmp_path / "outside.safetensors").exists()


# -- what the cache holds -----------------------------------------------------------------------------------
def test_cache_holds_only_tensors_and_metadata(sources, tmp_path):
    for kind in ("encoder", "head"):
        for container in PICKLED:
            read_checkpoint(sources[kind, container], cache_dir=tmp_path)
            read_checkpoint(sources[kind, container], cache_dir=tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for file in files:
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            header = int.from_bytes(data[:8], "little")
            assert data[8:9] == b"{"
            json.loads(data[8:8 + header])  # safetensors: a JSON header, then raw tensor bytes
            assert read_checkpoint(file, cache_dir=False).container == "safetensors"
        elif file.suffix == ".json":
            values = json.loads(data)
            assert all(isinstance(v, (str, int, float, dict)) for v in values.values())
        else:
            assert file.name == "CACHEDIR.TAG" or file.suffix == ".lock"
            assert not data.startswith((b"\x80", b"PK"))
    assert len(_entries(tmp_path)) == 4  # legacy and pickle, encoder and head
    assert (tmp_path / "v1" / "CACHEDIR.TAG").is_file() and not (tmp_path / "CACHEDIR.TAG").exists()


def test_refused_and_corrupt_sources_are_not_cached(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    unsafe = tmp_path / "unsafe.pt"
    unsafe.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(unsafe, cache_dir=tmp_path / "c")
    truncated = tmp_path / "truncated.pt"
    good = tmp_path / "good.pt"
    synth.save_module(synth.make_original_encoder(seed=1), good, "legacy")
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(truncated, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing behind: not even the folder


def test_an_unwritable_cache_is_bypassed(sources, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        ckpt = read_checkpoint(sources["encoder", "pickle"], cache_dir=blocker / "cache")
    assert ckpt.cache_entry is None
    assert "cannot use it" in caplog.text or "could not cache" in caplog.text
    _same(ckpt, read_checkpoint(sources["encoder", "pickle"], cache_dir=False))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_a_cache_owned_by_another_user_is_not_used(sources, tmp_path, caplog):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path / "c")
    assert read_checkpoint(path, cache_dir=tmp_path / "c").cache_entry is not None
    for file in [tmp_path / "c" / "v1", *(tmp_path / "c" / "v1").iterdir()]:  # planted by someone else
        os.chown(file, 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        ckpt = read_checkpoint(path, cache_dir=tmp_path / "c")  # a hit is not served from it either
    assert ckpt.cache_entry is None and "another user" in caplog.text
    _same(ckpt, read_checkpoint(path, cache_dir=False))


def test_concurrent_first_reads_fill_one_entry(sources, tmp_path):
    path = sources["encoder", "legacy"]
    direct = read_checkpoint(path, cache_dir=False)
    results, errors = [], []

    def load() -> None:
        try:
            results.append(read_checkpoint(path, cache_dir=tmp_path))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for ckpt in results:
        _same(ckpt, direct)
    assert [e.status for e in CheckpointCache(tmp_path).entries()] == ["fresh"]


# -- python -m pool cache info | clear -------------------------------------------------------------------
def test_cli_info_and_clear(sources, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "c"
    moved = _copy(sources["encoder", "pickle"], tmp_path / "moved.pt")
    changed = _copy(sources["encoder", "legacy"], tmp_path / "changed.pt")
    fresh = sources["encoder", "pickle"]
    for path in (moved, changed, fresh):
        read_checkpoint(path, cache_dir=cache_dir)
    moved.unlink()
    os.utime(changed, ns=(0, 0))
    assert main(["cache", "info", "--cache-dir", str(cache_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    status = {Path(e["source"]).name: e["status"] for e in report["entries"]}
    assert status == {"moved.pt": "missing", "changed.pt": "stale", fresh.name: "fresh"}
    assert report["bytes"] == sum(e["bytes"] for e in report["entries"]) > 0
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    assert main(["cache", "info"]) == 0
    text = capsys.readouterr().out
    assert "3 entries" in text and "1 fresh" in text and "1 stale" in text and "1 missing" in text
    assert "cache clear --unusable" in text
    assert main(["cache", "clear", "--unusable"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert [e.status for e in CheckpointCache(cache_dir).entries()] == ["fresh"]
    assert main(["cache", "clear"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert list(CheckpointCache(cache_dir).entries()) == []
    assert _entries(cache_dir) == []


def test_cli_without_a_cache_dir_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert main(["cache", "info"]) == 2
    err = capsys.readouterr().err
    assert CACHE_ENV in err and "--cache-dir" in err


def test_cli_info_on_an_empty_or_absent_cache(tmp_path, capsys):
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "0 entries" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()  # info creates nothing


# -- the red team's findings (each failed before its fix) -------------------------------------------------
def test_a_group_writable_cache_is_not_used(sources, tmp_path, caplog):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    os.chmod(tmp_path / "v1", 0o770)
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        assert read_checkpoint(path, cache_dir=tmp_path).cache_entry is None
    assert "other users" in caplog.text


@pytest.mark.parametrize("blocker", ["directory", "dangling symlink"])
def test_an_unusable_lock_file_does_not_fail_the_load(sources, tmp_path, blocker, caplog):
    from pool import cache_layout

    path = sources["encoder", "pickle"]
    (tmp_path / "v1").mkdir(mode=0o700)
    lock = tmp_path / "v1" / f"{cache_layout.key_of(Path(os.path.realpath(path)))}.lock"
    if blocker == "directory":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        ckpt = read_checkpoint(path, cache_dir=tmp_path)
    assert "could not cache" in caplog.text
    _same(ckpt, read_checkpoint(path, cache_dir=False))


def test_a_dtype_safetensors_lacks_is_read_directly_and_not_retried(tmp_path, caplog):
    path = tmp_path / "complex.pt"
    synth.save_object({"a": torch.arange(6, dtype=torch.float64).to(torch.complex128)}, path, "legacy")
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        first = read_checkpoint(path, cache_dir=tmp_path / "c")
    assert "could not cache" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pool.cache"):
        second = read_checkpoint(path, cache_dir=tmp_path / "c")
    assert caplog.text == ""  # recorded as uncacheable: no second attempt
    assert torch.equal(first.state_dict["a"], second.state_dict["a"])
    (item,) = CheckpointCache(tmp_path / "c").entries()
    assert item.status == "uncacheable" and "complex128" in item.reason


def test_a_symlink_retargeted_while_read_is_not_cached_under_its_old_target(tmp_path):
    from pool.containers import by_name
    from pool.containers.base import ReadOptions
    from pool.transfer import OpenFile

    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    b = synth.save_module(synth.make_original_encoder(seed=2), tmp_path / "b.pt", "legacy")
    link = tmp_path / "latest.pt"
    link.symlink_to(a)

    def flip_then_read(p, options, file):
        (tmp_path / "new").symlink_to(b)
        (tmp_path / "new").replace(link)  # a training job re-points latest.pt meanwhile
        return by_name("legacy").read(p, options, file)

    with OpenFile(link) as file:
        _same(CheckpointCache(tmp_path / "c").read(file, ReadOptions(), flip_then_read),
              read_checkpoint(a, cache_dir=False))  # the file opened is the file read
    _same(read_checkpoint(a, cache_dir=tmp_path / "c"), read_checkpoint(a, cache_dir=False))
    _same(read_checkpoint(b, cache_dir=tmp_path / "c"), read_checkpoint(b, cache_dir=False))


def test_an_entry_removed_between_lookup_and_read_does_not_fail_the_load(sources, tmp_path, monkeypatch):
    from pool import cache as cache_module

    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    real = cache_module.CheckpointCache._lookup

    def racing(self, *args):
        found = real(self, *args)
        CheckpointCache(tmp_path).clear()  # `cache clear` in another process
        return found

    monkeypatch.setattr(cache_module.CheckpointCache, "_lookup", racing)
    _same(read_checkpoint(path, cache_dir=tmp_path), read_checkpoint(path, cache_dir=False))


def test_a_file_changed_moments_ago_is_not_cached_yet(sources, tmp_path, monkeypatch):
    from pool import cache_layout

    monkeypatch.setattr(cache_layout, "RACY_SECONDS", 3600.0)
    path = _copy(sources["encoder", "pickle"], tmp_path / "fresh.pt")
    assert read_checkpoint(path, cache_dir=tmp_path / "c").cache_entry is None
    assert _entries(tmp_path / "c") == []
    monkeypatch.setattr(cache_layout, "RACY_SECONDS", 0.0)
    read_checkpoint(path, cache_dir=tmp_path / "c")
    assert read_checkpoint(path, cache_dir=tmp_path / "c").cache_entry is not None


def _plant(cache_dir: Path, change: dict[str, str]) -> None:
    """Rewrite the entry with its metadata changed, and re-index it (a self-consistent forgery)."""
    from pool import cache_layout

    (index,) = (cache_dir / "v1").glob("*.json")
    data = json.loads(index.read_text(encoding="utf-8"))
    entry = cache_dir / "v1" / data["entry"]
    ckpt = read_checkpoint(entry, cache_dir=False)
    import safetensors.torch

    safetensors.torch.save_file(dict(ckpt.state_dict), str(entry), metadata={**ckpt.metadata, **change})
    data["entry_identity"], data["entry_sample"] = cache_layout.probe(entry, nofollow=True)
    index.write_text(json.dumps(data), encoding="utf-8")


FORGED = {
    "modules of another shape": {"pool.cache.modules": '{"kinds":[["x.Y",[]]],"paths":{"":0}}'},
    "modules index out of range": {"pool.cache.modules": '{"kinds":[],"paths":{"":5}}'},
    "deeply nested keys": {"pool.cache.keys": "[" * 100000 + "]" * 100000},
    "a key order of another length": {"pool.cache.keys": "[0,1]"},
    "a safetensors container": {"pool.cache.container": "safetensors"},
    "an extra metadata key": {"pool.quick_gelu": "false"},
    "an unsafe global": {"pool.cache.globals": '[["os","system",true]]'},
}


@pytest.mark.parametrize("change", list(FORGED.values()), ids=list(FORGED))
def test_an_entry_that_is_not_what_the_cache_writes_is_rebuilt(sources, tmp_path, change, caplog):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    _plant(tmp_path, change)
    assert [e.status for e in CheckpointCache(tmp_path).entries()] == ["damaged"]  # info reads the contents too
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        ckpt = read_checkpoint(path, cache_dir=tmp_path)
    assert "damaged" in caplog.text
    _same(ckpt, read_checkpoint(path, cache_dir=False))
    assert ckpt.cache_entry is not None  # rebuilt, although the forged entry's file identity matched its index
    assert [e.status for e in CheckpointCache(tmp_path).entries()] == ["fresh"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        assert read_checkpoint(path, cache_dir=tmp_path).cache_entry is not None
    assert caplog.text == ""


def test_a_write_that_fails_for_a_passing_reason_is_retried(sources, tmp_path, monkeypatch, caplog):
    """A full disk, or a temporary file removed by a concurrent `cache clear`, is no property of the
    file: the next load tries again (only what safetensors cannot hold is recorded as uncacheable)."""
    from pool import cache_store

    path = sources["encoder", "pickle"]
    real = cache_store.write_checked

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_store, "write_checked", full_disk)
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        assert read_checkpoint(path, cache_dir=tmp_path).cache_entry is None
    assert "No space left" in caplog.text
    assert [e.status for e in CheckpointCache(tmp_path).entries()] == []
    monkeypatch.setattr(cache_store, "write_checked", real)
    read_checkpoint(path, cache_dir=tmp_path)
    assert read_checkpoint(path, cache_dir=tmp_path).cache_entry is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_fails_is_reported_as_without_the_cache(sources, tmp_path, caplog):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    with pytest.raises(Exception) as direct:
        read_checkpoint(path, cache_dir=False, map_location="cuda")
    with caplog.at_level(logging.WARNING, logger="pool.cache"), pytest.raises(type(direct.value)):
        read_checkpoint(path, cache_dir=tmp_path, map_location="cuda")
    assert "damaged" not in caplog.text
    assert [e.status for e in CheckpointCache(tmp_path).entries()] == ["fresh"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("fcntl") is None, reason="needs fcntl")
def test_clear_leaves_an_entry_being_written_and_an_orphan_takes_only_itself(sources, tmp_path):
    import fcntl

    from pool import cache_layout

    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    key = cache_layout.key_of(Path(os.path.realpath(path)))
    fresh = _entries(tmp_path)[0]
    orphan = fresh.with_name(f"{key}.{'0' * 16}.safetensors")
    shutil.copyfile(fresh, orphan)
    assert sorted(e.status for e in CheckpointCache(tmp_path).entries()) == ["fresh", "orphan"]
    CheckpointCache(tmp_path).clear(only_unusable=True)
    assert _entries(tmp_path) == [fresh]  # the orphan went, the fresh entry of the same key stayed
    with open(tmp_path / "v1" / f"{key}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another process is writing this key
        assert CheckpointCache(tmp_path).clear() == (0, 0)
    assert _entries(tmp_path) == [fresh]
    assert CheckpointCache(tmp_path).clear()[0] == 1 and _entries(tmp_path) == []


def test_a_deeply_nested_index_is_rebuilt(sources, tmp_path):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    _index(tmp_path).write_text("[" * 50000 + "]" * 50000, encoding="utf-8")
    assert read_checkpoint(path, cache_dir=tmp_path).cache_entry is not None


def test_checkpoint_path_is_the_path_given(sources, tmp_path, monkeypatch):
    link = tmp_path / "Cars_finetuned.pt"
    link.symlink_to(sources["encoder", "pickle"])
    monkeypatch.chdir(tmp_path)
    read_checkpoint("Cars_finetuned.pt", cache_dir=tmp_path / "c")
    ckpt = read_checkpoint("Cars_finetuned.pt", cache_dir=tmp_path / "c")
    assert ckpt.cache_entry is not None and ckpt.path == Path("Cars_finetuned.pt")


@pytest.mark.parametrize("value", ["", "0", "false", "OFF", "no", "none"])
def test_off_values_of_the_environment_variable(monkeypatch, value):
    monkeypatch.setenv(CACHE_ENV, value)
    assert resolve_cache_dir() is None


def test_clear_refuses_a_folder_that_is_no_cache_and_removes_only_its_own_files(tmp_path, capsys):
    v1 = tmp_path / "v1"
    v1.mkdir(mode=0o700)
    mine = ["d41d8cd98f00b204e9800998ecf8427e.json", "yarn.lock", ".session.tmp", "notes.txt"]
    for name in mine:
        (v1 / name).write_text("x", encoding="utf-8")
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 2
    assert "not a pool conversion cache" in " ".join(capsys.readouterr().err.split())  # wrapped to the terminal
    assert sorted(os.listdir(v1)) == sorted(mine)
    (v1 / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n", encoding="utf-8")
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert sorted(os.listdir(v1)) == sorted(["CACHEDIR.TAG", ".session.tmp", "notes.txt", "yarn.lock"])


def test_info_survives_odd_indexes_and_a_fifo_entry(sources, tmp_path, capsys):
    path = sources["encoder", "pickle"]
    read_checkpoint(path, cache_dir=tmp_path)
    index = _index(tmp_path)
    data = json.loads(index.read_text(encoding="utf-8"))
    entry = tmp_path / "v1" / data["entry"]
    entry.unlink()
    os.mkfifo(entry)
    from pool import cache_layout

    data["entry_identity"] = cache_layout.identity(entry.lstat())
    data["created"] = "yesterday"
    index.write_text(json.dumps(data), encoding="utf-8")
    assert main(["cache", "info", "--cache-dir", str(tmp_path), "--json"]) == 0  # returns: the FIFO is not read
    (item,) = json.loads(capsys.readouterr().out)["entries"]
    assert item["status"] == "damaged" and item["created"] == 0.0
    assert main(["cache", "clear", "--unusable", "--cache-dir", str(tmp_path)]) == 0
    assert not entry.exists()


def test_verify_of_the_embedded_default_caches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert main(["verify"]) == 0
    capsys.readouterr()
    assert not (tmp_path / "c").exists()

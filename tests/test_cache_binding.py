"""The conversion cache is bound to the bytes it read (docs/design.md §4.5): one descriptor per read gives
the mapping, the preads, the identity and the sampled digest, so a path re-pointed during a read
cannot put one file's tensors under another's identity; the cache's own folder is checked without
following links (``v1``, its index, entry and tag files), and a folder others could swap is not
used; a path that cannot be opened (a symlink loop, a name too long) is a typed CheckpointError.

Each test here failed before its fix, except where its docstring says it guards a case that held."""

from __future__ import annotations

import errno
import importlib
import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors

from pool import synth
from pool.cache import CheckpointCache
from pool.checkpoint import read_checkpoint, sniff_container
from pool.containers import by_name
from pool.containers.base import ReadOptions
from pool.errors import CheckpointError, NotACacheError, UnreadableCheckpointError

CACHED = ("legacy", "pickle")  # the containers the cache copies (pool.cache.CACHEABLE)
_MODULE = {"legacy": "pool.containers.legacy", "pickle": "pool.containers.rawpickle"}


@pytest.fixture(autouse=True)
def settled(monkeypatch):
    """Files written by a test are seconds old at most: let the cache take them."""
    from pool import cache_layout

    monkeypatch.setattr(cache_layout, "RACY_SECONDS", 0.0)


def _same(a, b) -> None:
    """Two checkpoints hold the same tensors, bit for bit."""
    assert_same_tensors(a, b)


def _differ(a, b) -> bool:
    return any(not torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def _tampered_copy(source: Path, target: Path) -> Path:
    """``source`` with the bytes of its float tensors changed in place: same length, same pickles,
    same storage offsets, other weights (tensor bytes located by content)."""
    data = bytearray(source.read_bytes())
    changed = 0
    for tensor in read_checkpoint(source, cache_dir=False).state_dict.values():
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if not tensor.is_floating_point() or len(raw) < 64 or data.count(raw) != 1:
            continue
        at = data.index(raw)
        data[at:at + len(raw)] = (tensor + 1).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        changed += 1
    assert changed > 0
    target.write_bytes(bytes(data))
    return target


def _point(link: Path, target: Path) -> None:
    """Re-point ``link`` at ``target`` in one rename, as a training job updating latest.pt does."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.replace(link)


# -- one descriptor per read ----------------------------------------------------------------------------
@pytest.mark.parametrize("container", CACHED)
def test_a_link_flipped_during_the_first_read_never_serves_the_other_file(tmp_path, monkeypatch, container):
    """The link flips to B exactly while the file's ranges are opened and back to A at once: a
    read that reopens the path takes B's tensor bytes with A's pickle and identity."""
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", container)
    b = _tampered_copy(a, tmp_path / "b.pt")
    want_a, want_b = read_checkpoint(a, cache_dir=False), read_checkpoint(b, cache_dir=False)
    assert _differ(want_a, want_b)
    link = tmp_path / "latest.pt"
    link.symlink_to(a)
    module = importlib.import_module(_MODULE[container])
    real = module.FileRanges

    def flipping(*args, **kwargs):
        _point(link, b)
        try:
            return real(*args, **kwargs)
        finally:
            _point(link, a)

    monkeypatch.setattr(module, "FileRanges", flipping)
    first = read_checkpoint(link, cache_dir=tmp_path / "c")
    monkeypatch.undo()
    _same(first, want_a)
    for _ in range(2):  # the entry, if any, holds A's bytes
        _same(read_checkpoint(a, cache_dir=tmp_path / "c"), want_a)
        _same(read_checkpoint(link, cache_dir=tmp_path / "c"), want_a)
    _same(read_checkpoint(b, cache_dir=tmp_path / "c"), want_b)


def test_the_cache_records_the_identity_of_the_descriptor_read(tmp_path, monkeypatch):
    """The path is re-pointed between the open and the cache's lookup: the cache must not record
    B's identity (or key) for A's bytes."""
    from pool import cache as cache_module

    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    b = _tampered_copy(a, tmp_path / "b.pt")
    want_a, want_b = read_checkpoint(a, cache_dir=False), read_checkpoint(b, cache_dir=False)
    link = tmp_path / "latest.pt"
    link.symlink_to(a)
    real = cache_module.CheckpointCache.read

    def flip_then_look_up(self, file, *args, **kwargs):
        _point(link, b)
        return real(self, file, *args, **kwargs)

    monkeypatch.setattr(cache_module.CheckpointCache, "read", flip_then_look_up)
    _same(read_checkpoint(link, cache_dir=tmp_path / "c"), want_a)  # the bytes of the file opened
    monkeypatch.undo()
    for _ in range(2):
        _same(read_checkpoint(b, cache_dir=tmp_path / "c"), want_b)
        _same(read_checkpoint(a, cache_dir=tmp_path / "c"), want_a)


def test_an_entry_swapped_for_a_symlink_after_its_lookup_is_not_followed(tmp_path, monkeypatch):
    """Between the lookup (identity checked) and the read of the entry, the entry becomes a link
    to another file's entry: its tensors must not be served."""
    from pool import cache as cache_module

    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    b = synth.save_module(synth.make_original_encoder(seed=2), tmp_path / "b.pt", "legacy")
    cache = tmp_path / "c"
    for path in (a, b, a, b):
        read_checkpoint(path, cache_dir=cache)
    entry_a = read_checkpoint(a, cache_dir=cache).cache_entry
    entry_b = read_checkpoint(b, cache_dir=cache).cache_entry
    assert entry_a is not None and entry_b is not None
    real = cache_module.CheckpointCache._lookup

    def swapping(self, *args):
        found = real(self, *args)
        if found == entry_a:
            os.unlink(entry_a)
            os.symlink(entry_b, entry_a)
        return found

    monkeypatch.setattr(cache_module.CheckpointCache, "_lookup", swapping)
    got = read_checkpoint(a, cache_dir=cache)
    monkeypatch.undo()
    _same(got, read_checkpoint(a, cache_dir=False))
    assert not entry_a.is_symlink() or got.cache_entry != entry_a


def test_an_index_replaced_by_a_symlink_is_not_followed(tmp_path):
    """Guards a case that held before: an index that is a link is damage, rebuilt in place (the
    link replaced, its target untouched)."""
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    cache = tmp_path / "c"
    read_checkpoint(a, cache_dir=cache)
    (index,) = (cache / "v1").glob("*.json")
    outside = tmp_path / "outside.json"
    outside.write_bytes(index.read_bytes())
    before = outside.read_bytes()
    index.unlink()
    index.symlink_to(outside)
    _same(read_checkpoint(a, cache_dir=cache), read_checkpoint(a, cache_dir=False))
    assert not index.is_symlink() and outside.read_bytes() == before


# -- the cache's own folder ---------------------------------------------------------------------------
def test_a_v1_symlink_is_refused_and_nothing_is_written_through_it(tmp_path, caplog):
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "v1").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        for _ in range(2):
            ckpt = read_checkpoint(a, cache_dir=cache)
            assert ckpt.cache_entry is None
            _same(ckpt, read_checkpoint(a, cache_dir=False))
    assert "symbolic link" in caplog.text
    assert list(elsewhere.iterdir()) == []
    assert list(CheckpointCache(cache).entries()) == []
    with pytest.raises(NotACacheError):
        CheckpointCache(cache).clear()


def test_a_v1_symlink_to_a_filled_cache_is_not_served(tmp_path):
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    real = tmp_path / "real"
    read_checkpoint(a, cache_dir=real)
    assert read_checkpoint(a, cache_dir=real).cache_entry is not None
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "v1").symlink_to(real / "v1")
    assert read_checkpoint(a, cache_dir=cache).cache_entry is None


def test_a_dangling_tag_symlink_is_not_written_through(tmp_path):
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    cache = tmp_path / "c"
    (cache / "v1").mkdir(parents=True, mode=0o700)
    target = tmp_path / "outside" / "planted"
    target.parent.mkdir()
    (cache / "v1" / "CACHEDIR.TAG").symlink_to(target)
    read_checkpoint(a, cache_dir=cache)
    assert not target.exists()
    with pytest.raises(NotACacheError):  # a tag that is a link is no tag of ours
        CheckpointCache(cache).clear()


@pytest.mark.parametrize("mode,used", [(0o777, False), (0o775, False), (0o1777, True), (0o755, True)])
def test_a_parent_others_can_write_is_refused_unless_sticky(tmp_path, caplog, mode, used):
    """Whoever can write the folder holding ``v1`` can swap ``v1`` after it was checked."""
    a = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "a.pt", "legacy")
    cache = tmp_path / "c"
    cache.mkdir()
    os.chmod(cache, mode)
    with caplog.at_level(logging.WARNING, logger="pool.cache"):
        read_checkpoint(a, cache_dir=cache)
        ckpt = read_checkpoint(a, cache_dir=cache)
    assert (ckpt.cache_entry is not None) is used
    if not used:
        assert "other users" in caplog.text and not list((cache / "v1").glob("*.safetensors"))
    _same(ckpt, read_checkpoint(a, cache_dir=False))


# -- a path that cannot be opened is a typed error ------------------------------------------------------
@pytest.mark.parametrize("case", ["loop", "too long"])
def test_an_unopenable_path_is_a_typed_checkpoint_error(tmp_path, case):
    if case == "loop":
        path = tmp_path / "loop.pt"
        path.symlink_to(path)
        code, hint = errno.ELOOP, "loop"
    else:
        path = tmp_path / ("x" * 300 + ".pt")
        code, hint = errno.ENAMETOOLONG, "too long"
    for call in (lambda: read_checkpoint(path), lambda: read_checkpoint(path, cache_dir=tmp_path / "c"),
                 lambda: sniff_container(path), lambda: by_name("legacy").read(path, ReadOptions())):
        with pytest.raises(UnreadableCheckpointError) as info:
            call()
        assert isinstance(info.value, CheckpointError) and isinstance(info.value, OSError)
        assert info.value.errno == code
        message = str(info.value)
        assert str(path)[:60] in message and hint in message.lower()

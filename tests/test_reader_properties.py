"""Property tests of the reader (hypothesis: bounded and derandomised by default so CI is stable;
``POOL_HYPOTHESIS_PROFILE=fuzz`` for thousands of random examples, see conftest.py).

(a) For random tiny ViT configurations and weights, every container yields a state dict equal key
    for key and bit for bit to the module's own ``state_dict()``.
(b) Truncating or mutating a small real checkpoint in any container gives either a successful read
    or a `CheckpointError` naming the file: never another exception, never a hang, never a large
    allocation (each read's own peak RSS, measured in a forked child).
"""

from __future__ import annotations

import contextlib
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import SMALL_ARCH, examples, peak_rss_above, reset_peak_rss, run_isolated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool import synth
from pool.arch import VisionArch
from pool.checkpoint import read_checkpoint
from pool.errors import CheckpointError
from pool.synth import save_object

FORMS = ["zip", "legacy", "pickle", "state_dict", "safetensors", "wrapped"]
PROPERTY = settings(max_examples=examples(12), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings(max_examples=examples(30), deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
READ_PEAK_LIMIT = 256 << 20  # what one read of a mutated ~100 KB file may add to the peak RSS


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def write_form(module: torch.nn.Module, path: Path, form: str) -> dict[str, torch.Tensor]:
    """Write `module` in `form`; return the state dict the reader must give back."""
    expected = module.state_dict()
    if form in synth.ENCODER_CONTAINERS:
        synth.save_module(module, path, form)
    elif form == "wrapped":
        expected = {f"module.{k}": v for k, v in expected.items()}
        torch.save({"state_dict": expected, "epoch": 1}, path)
    else:
        synth.save_state_dict(expected, path, "safetensors" if form == "safetensors" else "torch")
    return expected


@contextlib.contextmanager
def hang_guard(seconds: int = 60) -> Iterator[None]:
    """Fail instead of hanging forever (a safety net, not a timing assertion)."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"the reader hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- (a) every container, random tiny configurations ----------------------------------------------
@st.composite
def tiny_archs(draw) -> VisionArch:
    width = draw(st.sampled_from([32, 48, 64, 96]))
    heads = draw(st.sampled_from([1, 2, 4]))
    image_size, patch_size = draw(st.sampled_from([(16, 4), (16, 8), (32, 8), (32, 4)]))
    return VisionArch(
        image_size=image_size, patch_size=patch_size, width=width,
        layers=draw(st.integers(1, 3)), heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
        embed_dim=draw(st.integers(8, 32)), quick_gelu=draw(st.booleans()),
        text_context_length=4, text_vocab_size=16, text_width=16)


@PROPERTY
@given(arch=tiny_archs(), seed=st.integers(0, 2**16), form=st.sampled_from(FORMS))
def test_every_container_round_trips_bit_for_bit(arch, seed, form):
    module = synth.make_original_encoder(arch, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        expected = write_form(module, path, form)
        for mmap in (None, False):
            ckpt = read_checkpoint(path, mmap=mmap)
            got = ckpt.state_dict
            if form == "safetensors":
                assert sorted(got) == sorted(expected)
            else:
                assert list(got) == list(expected)
            for key, value in expected.items():
                assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
                assert torch.equal(bits(got[key]), bits(value)), key
            del ckpt, got  # release the mapping before the directory goes
    assert "src" not in sys.modules


@PROPERTY
@given(num_classes=st.integers(1, 40), embed_dim=st.integers(1, 64), seed=st.integers(0, 2**16),
       normalize=st.booleans(), container=st.sampled_from(synth.ENCODER_CONTAINERS))
def test_heads_round_trip(num_classes, embed_dim, seed, normalize, container):
    head = synth.make_original_head(num_classes, embed_dim, seed=seed, normalize=normalize)
    with tempfile.TemporaryDirectory() as tmp:
        path = synth.save_module(head, Path(tmp) / "head.pt", container)
        ckpt = read_checkpoint(path)
        assert ckpt.attributes["normalize"] is normalize
        assert list(ckpt.state_dict) == ["weight", "bias"]
        assert torch.equal(bits(ckpt.state_dict["weight"]), bits(head.weight))
        assert torch.equal(bits(ckpt.state_dict["bias"]), bits(head.bias))
        del ckpt


@PROPERTY
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                              torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]),
       container=st.sampled_from(["zip", "legacy", "pickle", "state_dict", "safetensors"]),
       seed=st.integers(0, 1000))
def test_arbitrary_state_dicts_round_trip(shapes, dtype, container, seed):
    gen = torch.Generator().manual_seed(seed)
    expected = {}
    for i, shape in enumerate(shapes):
        raw = torch.randint(0, 255, shape, generator=gen, dtype=torch.uint8)
        expected[f"layer{i}.weight"] = raw.to(dtype) if dtype is not torch.bool else raw > 127
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd"
        if container in ("state_dict", "safetensors"):
            synth.save_state_dict(expected, path, "safetensors" if container == "safetensors" else "torch")
        else:
            save_object(expected, path, container)
        got = read_checkpoint(path).state_dict
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape
            assert torch.equal(bits(got[key]), bits(value)), key
        del got


# -- (b) truncation and mutation never escape as anything but CheckpointError ---------------------
FUZZ_FORMS = ["zip", "legacy", "pickle", "pickle2", "state_dict", "safetensors", "head_zip",
              "head_legacy", "head_pickle"]
SMALL = replace(SMALL_ARCH, mlp_ratio=1.0)


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict[str, bytes]:
    """Small real checkpoints, written once: the bytes the fuzzer starts from."""
    import pickle

    root = tmp_path_factory.mktemp("fuzz_base")
    encoder = synth.make_original_encoder(SMALL, seed=7)
    head = synth.make_original_head(3, SMALL.embed_dim, seed=7)
    out: dict[str, bytes] = {}
    for container in synth.ENCODER_CONTAINERS:
        out[container] = synth.save_module(encoder, root / container, container).read_bytes()
        out[f"head_{container}"] = synth.save_module(head, root / f"h{container}", container).read_bytes()
    with synth.legacy_modeling_module():
        out["pickle2"] = pickle.dumps(encoder, protocol=2)
    out["state_dict"] = synth.save_state_dict(encoder.state_dict(), root / "sd").read_bytes()
    out["safetensors"] = synth.save_state_dict(encoder.state_dict(), root / "st", "safetensors").read_bytes()
    for form, data in out.items():  # every base file reads: the fuzz starts from valid input
        check = root / f"check_{form}"
        check.write_bytes(data)
        assert read_checkpoint(check).state_dict, form
    return out


@st.composite
def mutations(draw, size: int) -> list[tuple]:
    """A few edits, with positions biased towards the structural ends of the file (headers, the
    pickle, the zip directory) where the interesting failures are."""
    edge = min(size, 2048)
    position = st.one_of(st.integers(0, size - 1), st.integers(0, edge - 1),
                         st.integers(size - edge, size - 1))
    edit = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("int"), position, st.sampled_from([0, 1, 255, 2**31 - 1, 2**32 - 1,
                                                             2**40, 2**63 - 1, 2**64 - 1])),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    )
    edits = draw(st.lists(edit, min_size=1, max_size=3))
    if draw(st.booleans()):
        edits.append(("truncate", draw(position), 0))
    return edits


def apply(data: bytes, edits: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(len(buf) - 1, 0))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << arg
        elif kind == "set":
            buf[pos:pos + len(arg)] = arg
        elif kind == "int":
            raw = struct.pack("<Q", arg)
            buf[pos:pos + 8] = raw
        elif kind == "delete":
            del buf[pos:pos + arg]
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


def read_or_checkpoint_error(path: Path) -> None:
    """The property: success (a dict of tensors) or a CheckpointError naming the file."""
    for mmap in (None, False):
        try:
            with hang_guard():
                sd = read_checkpoint(path, mmap=mmap).state_dict
        except CheckpointError as exc:
            assert str(path) in str(exc), str(exc)
        else:
            assert sd and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
            del sd


def fuzz_in_child(base: bytes, target: Path) -> int:
    """(In a forked child.) The property on mutations of ``base``, plus a bound on each read's own
    peak RSS: no mutated size may make the reader touch more than a little memory (the files are
    ~100 KB). Returns the largest peak seen."""
    worst = 0

    @FUZZ
    @given(edits=mutations(len(base)))
    def check(edits):
        nonlocal worst
        target.write_bytes(apply(base, edits))
        baseline = reset_peak_rss()
        read_or_checkpoint_error(target)
        extra = peak_rss_above(baseline)
        worst = max(worst, extra)
        assert extra < READ_PEAK_LIMIT, f"reading the mutated file added {extra >> 20} MiB to the peak RSS"

    check()
    return worst


@pytest.mark.parametrize("form", FUZZ_FORMS)
def test_mutated_checkpoints_fail_cleanly(base_files, tmp_path, form):
    # In a forked child: a peak measured in this process (ru_maxrss) cannot fail once any earlier
    # test peaked higher; the child's is its own. Its watchdog ends it at 1.5 GiB of growth.
    report = run_isolated(fuzz_in_child, base_files[form], tmp_path / "mutated.pt",
                          timeout=60 + FUZZ.max_examples / 2)
    if report.kind == "raised":
        pytest.fail(f"{report.exc['type']}: {report.exc['message']}\n{report.exc['tb']}", pytrace=False)
    assert report.kind == "returned", report
    assert report.value < READ_PEAK_LIMIT


@pytest.mark.parametrize("form", FUZZ_FORMS)
def test_every_truncation_point_of_the_structure_fails_cleanly(base_files, tmp_path, form):
    """Deterministic sweep: cut the file at many offsets, denser near the ends."""
    base = base_files[form]
    n = len(base)
    cuts = sorted({*range(0, min(n, 600), 7), *range(max(0, n - 600), n, 7),
                   *(n * k // 40 for k in range(40))})
    target = tmp_path / "cut.pt"
    for cut in cuts:
        target.write_bytes(base[:cut])
        with pytest.raises(CheckpointError) as info, hang_guard():
            read_checkpoint(target)
        assert str(target) in str(info.value)

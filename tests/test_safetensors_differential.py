"""Differential property (docs/design.md §4.4): what `pool` returns for a safetensors file,
``safetensors.torch.load_file`` returns too, key for key and byte for byte; where the library
refuses a file, `pool` raises a `CheckpointError`.

A real file (several dtypes, a scalar, a 0-element tensor, metadata; written by the library) is
mutated with structure-aware edits of its header (offsets shifted, swapped or overlapping, a hidden
prefix, gaps, trailing bytes, duplicate JSON names, other dtypes and shapes, extra empty tensors,
bad metadata, a header length a little off) and random byte flips, and both readers read it.
Bounded and derandomised by default; ``POOL_HYPOTHESIS_PROFILE=fuzz`` tries thousands of examples.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import examples
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pool.checkpoint import load_state_dict
from pool.containers.safetensors_file import MAX_HEADER_BYTES, MAX_HEADER_ITEMS, MAX_TENSORS
from pool.errors import CheckpointError, CorruptCheckpointError
from pool.integrity import check_integrity

PROPERTY = settings(max_examples=examples(150), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "U16", "U32",
          "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F8_E4M3FNUZ", "f32", "X", ""]


def base_state() -> dict[str, torch.Tensor]:
    """A small state dict: several dtypes, a scalar and a 0-element tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
        "visual.ln.weight": torch.randn(6, generator=g).half(),
        "visual.ln.bias": torch.randn(6, generator=g).bfloat16(),
        "visual.proj": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "logit_scale": torch.tensor(4.6),
        "positions": torch.arange(7, dtype=torch.int64),
        "counts": torch.arange(5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(9, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
    }


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file -> (its header as a dict, in file order, and its data section)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict[str, Any] | str, blob: bytes, *, pad: bool = True) -> bytes:
    """A header (a dict, or raw JSON text) and a data section -> the file's bytes."""
    text = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st_differential") / "base.safetensors"
    safetensors.torch.save_file(base_state(), str(path), metadata={"format": "pt", "arch": "tiny"})
    return path.read_bytes()


# -- the comparison -------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def both(data: bytes) -> tuple[dict[str, torch.Tensor] | Exception, dict[str, torch.Tensor] | CheckpointError]:
    """(the library's result or exception, pool's result or CheckpointError) for one file.

    Any other exception from `pool` propagates: it is a bug, not a refusal."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "m.safetensors"
        path.write_bytes(data)
        try:
            ours: Any = load_state_dict(path)
        except CheckpointError as exc:
            ours = exc
        try:
            theirs: Any = safetensors.torch.load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any refusal of the library counts as one
            theirs = exc
        if isinstance(ours, dict):  # compare before the directory (and the mapped file) goes
            ours = {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in ours.items()}
        if isinstance(theirs, dict):
            theirs = {k: (v.dtype, tuple(v.shape), bits(v)) for k, v in theirs.items()}
    return theirs, ours


def assert_agree(data: bytes) -> None:
    """pool returns only what the library returns; where the library refuses, pool refuses."""
    theirs, ours = both(data)
    event(f"library {'reads' if isinstance(theirs, dict) else 'refuses'}, "
          f"pool {'reads' if isinstance(ours, dict) else 'refuses'}")
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), f"pool loaded a file the library refuses: {theirs!r}"
        assert ours == theirs
    else:
        assert isinstance(ours, CheckpointError)


# -- structure-aware mutations of the header ----------------------------------------------------
def names(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _shift(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    which = draw(st.sampled_from([0, 1, None]))
    delta = draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8]))
    entry["data_offsets"] = [o + delta if which in (None, i) else o for i, o in enumerate(entry["data_offsets"])]
    return header, blob


def _swap(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    return header, blob


def _overlap(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    header[other] = dict(entry)  # `other` becomes a second name for `name`'s bytes
    return header, blob


def _inserted(kind: str) -> Callable:
    """Bytes put in front of the data (``prefix``) or after `entry` (``gap``); the tensors behind move."""

    def edit(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
        k = draw(st.integers(1, 16))
        at = 0 if kind == "prefix" else entry["data_offsets"][1]
        blob = blob[:at] + bytes(k) + blob[at:]
        for e in names(header):  # every tensor from `at` on moves (for a gap: but `entry` itself)
            start, end = header[e]["data_offsets"]
            if start >= at and (kind == "prefix" or header[e] is not entry):
                header[e]["data_offsets"] = [start + k, end + k]
        return header, blob

    return edit


def _trailing(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    return header, blob + draw(st.binary(min_size=1, max_size=16))


def _truncate(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    return header, blob[:-draw(st.integers(1, min(16, len(blob))))]


def _duplicate(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    text = json.dumps(header, separators=(",", ":"))
    copy = draw(st.sampled_from([entry, header[other], {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}]))
    field = draw(st.sampled_from(["", "dtype", "__metadata__", "format"]))
    if field == "":
        text = text[:-1] + "," + json.dumps(name) + ":" + json.dumps(copy, separators=(",", ":")) + "}"
    elif field == "dtype":
        text = text.replace('"dtype":', '"dtype":"U8","dtype":', 1)
    elif field == "__metadata__":
        text = text[:-1] + ',"__metadata__":{"format":"pt"}}'
    else:
        text = text.replace('"format":', '"format":"np","format":', 1)
    return text, blob


def _dtype(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    entry["dtype"] = draw(st.sampled_from(DTYPES))
    return header, blob


def _shape(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    shape = entry["shape"]
    how = draw(st.sampled_from(["reverse", "flatten", "unsqueeze", "bump", "zero", "huge"]))
    if how == "reverse":
        shape.reverse()
    elif how == "flatten":
        entry["shape"] = [math.prod(shape)]
    elif how == "unsqueeze":
        shape.insert(draw(st.integers(0, len(shape))), 1)
    elif shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = {"bump": shape[i] + 1, "zero": 0, "huge": 2**63}[how]
    return header, blob


def _empty(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    """Extra 0-byte tensors: fine at a boundary, an overlap inside a tensor."""
    for i in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(blob)))
        header[f"extra.{i}"] = {"dtype": draw(st.sampled_from(["F32", "U8"])), "shape": [0], "data_offsets": [at, at]}
    return header, blob


def _metadata(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    header["__metadata__"] = draw(st.sampled_from([None, [], "", 0, {}, {"a": 1}, {"a": None},
                                                   {"a": ["x"]}, {"a": {"b": "c"}}, {"a": "b"}]))
    return header, blob


def _extra(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    entry[draw(st.sampled_from(["offsets", "Dtype", "x"]))] = draw(st.sampled_from([1, "x", [], None]))
    return header, blob


def _escape(draw, header: dict, blob: bytes, entry: dict, name: str, other: str) -> tuple:
    """The same text spelt with JSON escapes, or a lone surrogate, or a float."""
    text = json.dumps(header, separators=(",", ":"))
    swap = draw(st.sampled_from([('"dtype"', '"dt\\u0079pe"'), (f'{json.dumps(name)}:', '"\\ud800":'),
                                 ('"shape":[', '"shape":[1.0,'), ('"data_offsets":[0', '"data_offsets":[-0'),
                                 ('"shape":[', '"shape":[ ')]))
    return text.replace(*swap, 1), blob


HEADER_EDITS: dict[str, Callable] = {
    "shift": _shift, "swap": _swap, "overlap": _overlap, "prefix": _inserted("prefix"), "gap": _inserted("gap"),
    "trailing": _trailing, "truncate": _truncate, "duplicate": _duplicate, "dtype": _dtype, "shape": _shape,
    "empty": _empty, "metadata": _metadata, "extra": _extra, "escape": _escape,
}


@st.composite
def header_edit(draw, header: dict[str, Any], blob: bytes) -> tuple[dict[str, Any] | str, bytes]:
    """One edit of (header, data): returns the new header (dict, or raw JSON text) and data."""
    header = json.loads(json.dumps(header))
    keys = names(header)
    name = draw(st.sampled_from(keys))
    other = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(list(HEADER_EDITS)))
    return HEADER_EDITS[kind](draw, header, blob, header[name], name, other)


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """1-3 header edits, then maybe a header length a little off and a few random byte flips."""
    header, blob = split(base)
    text: dict[str, Any] | str = header
    for _ in range(draw(st.integers(1, 3))):
        if isinstance(text, str):
            break
        text, blob = draw(header_edit(text, blob))
    data = bytearray(join(text, blob))
    if draw(st.booleans()):
        (n,) = struct.unpack("<Q", data[:8])
        data[:8] = struct.pack("<Q", max(0, n + draw(st.sampled_from([-8, -2, -1, 1, 2, 8]))))
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@PROPERTY
@given(data=st.data())
def test_pool_returns_only_what_the_library_returns(base_file, data):
    assert_agree(data.draw(mutated(base_file)))


@settings(PROPERTY, max_examples=examples(60))
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4))
def test_byte_flips_anywhere(base_file, edits):
    data = bytearray(base_file)
    for pos, bit in edits:
        data[pos % len(data)] ^= 1 << bit
    assert_agree(bytes(data))


def test_the_base_file_reads_the_same(base_file):
    theirs, ours = both(base_file)
    assert isinstance(ours, dict) and ours == theirs and len(ours) == len(base_state())


# -- regressions: each a refusal of both readers ------------------------------------------------
def refused_by_both(tmp_path: Path, data: bytes, match: str) -> CorruptCheckpointError:
    """Both readers refuse ``data``; pool (read and integrity) with a CorruptCheckpointError."""
    theirs, ours = both(data)
    assert not isinstance(theirs, dict), "the library reads this file: the test is wrong"
    assert isinstance(ours, CorruptCheckpointError), ours
    assert match in str(ours) and "safetensors header check failed" in str(ours)
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match=match):
        check_integrity(path)
    return ours


def test_overlapping_tensors_are_refused(tmp_path):
    """Ranges 0..4 and 2..6 of 6 bytes: nothing is missing, but two tensors share bytes 2..4."""
    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
              "b": {"dtype": "U8", "shape": [2, 2], "data_offsets": [2, 6]}}
    refused_by_both(tmp_path, join(header, b"abcdef"), "overlaps")


def test_a_second_name_for_the_same_bytes_is_refused(tmp_path, base_file):
    header, blob = split(base_file)
    header["alias"] = dict(header["visual.conv1.weight"])
    refused_by_both(tmp_path, join(header, blob), "overlaps")


def test_a_hidden_prefix_is_refused(tmp_path, base_file):
    """Bytes before the first tensor that no tensor owns (a place to hide a payload)."""
    header, blob = split(base_file)
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        entry["data_offsets"] = [o + 64 for o in entry["data_offsets"]]
    refused_by_both(tmp_path, join(header, b"\xcc" * 64 + blob), "hidden prefix")


def test_a_gap_between_tensors_is_refused(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]}}
    refused_by_both(tmp_path, join(header, b"abcde"), "gap")


def test_trailing_bytes_are_refused(tmp_path, base_file):
    refused_by_both(tmp_path, base_file + b"\0" * 8, "trailing bytes")


@pytest.mark.parametrize("header, match", [
    ('{"a":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "appears twice"),
    ('{"__metadata__":{},"__metadata__":{},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "appears twice"),
    ('{"__metadata__":[],"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "__metadata__"),
    ('{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "__metadata__"),
    ('{"a":{"dtype":"U8","shape":[-0,2],"data_offsets":[0,0]}}', "negative"),
    ('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', "not an integer"),
    ('{"a\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', "surrogate"),
    ('{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,2]}}', "beyond 64 bits"),
    ('{"a":{"dtype":"U8","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}', "overflows"),
    ('{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}', "whole number of bytes"),
    ('{"a":{"dtype":"u8","shape":[2],"data_offsets":[0,2]}}', "unknown dtype"),
], ids=["dup-field", "dup-metadata", "metadata-list", "metadata-int", "minus-zero", "float", "surrogate",
        "2^64", "overflow", "f4-half-byte", "dtype-case"])
def test_what_the_library_refuses_in_a_header(tmp_path, header, match):
    data = join(header, b"xy" if '"data_offsets":[0,2]' in header else b"\0" if "F4" in header else b"")
    refused_by_both(tmp_path, data, match)


def test_duplicate_tensor_names_are_refused(tmp_path):
    """The library keeps the last of two equal names (serde); pool refuses the ambiguity."""
    header = ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
              '"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}')
    theirs, ours = both(join(header, b"xy"))
    assert isinstance(theirs, dict) and theirs["a"][1] == (2,)  # what pool refuses to guess at
    assert isinstance(ours, CorruptCheckpointError) and "appears twice" in str(ours)


def test_a_header_over_the_library_limit_is_refused(tmp_path):
    """100,000,001 header bytes in a (sparse) file large enough to hold them."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
        f.truncate(MAX_HEADER_BYTES + 64)
    with pytest.raises(CorruptCheckpointError, match="100,000,000"):
        load_state_dict(path)
    with pytest.raises(Exception, match="too large"):
        safetensors.torch.load_file(str(path))


def test_a_count_bomb_is_a_typed_error(tmp_path):
    """1.5 million empty tensors (88 MB) took 72 s and 1.8 GB, then a bare MemoryError: such a
    header is now refused while counting its JSON items, before parsing it (400,000 here, 24 MB)."""
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = "{" + ",".join(f'"t{i}":{entry}' for i in range(400_000)) + "}"
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(join(header, b""))
    with pytest.raises(CorruptCheckpointError, match="JSON items"):
        load_state_dict(path)
    with pytest.raises(CorruptCheckpointError, match="JSON items"):
        check_integrity(path)


@pytest.mark.parametrize("extra, match", [(1, "lists 100,001 tensors"), (2, "JSON objects")])
def test_tensors_beyond_the_cap_are_refused(tmp_path, extra, match):
    """Within the JSON item budget (7 items per empty tensor), the tensor count itself is capped:
    one over it is refused after parsing, two over it while parsing (objects are counted)."""
    entry = '{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = "{" + ",".join(f'"{i}":{entry}' for i in range(MAX_TENSORS + extra)) + "}"
    assert header.count(",") + header.count("{") + header.count("[") <= MAX_HEADER_ITEMS
    path = tmp_path / "many.safetensors"
    path.write_bytes(join(header, b""))
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        load_state_dict(path)
    assert f"{MAX_TENSORS:,} tensors" in str(info.value)


def test_zero_length_tensors_on_a_boundary_read_as_the_library_reads_them(base_file):
    header, blob = split(base_file)
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["at_start"] = {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}
    header["at_end"] = {"dtype": "U8", "shape": [0], "data_offsets": [end, end]}
    theirs, ours = both(join(header, blob))
    assert isinstance(ours, dict) and ours == theirs and "at_end" in ours

"""The command line: every command through its entry point, including failure paths and exit codes.

Most tests call `pool.cli.main` in-process (capsys); a few run real subprocesses through
``python -m pool`` and the installed ``openclip-pool`` console script.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import member_spans
from omegaconf import OmegaConf

import pool
from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool, read_checkpoint, synth
from pool.cli import main
from pool.errors import CorruptCheckpointError
from pool.integrity import check_integrity
from pool.report import Style, human_count, human_size, human_time
from pool.verify import prepare_pool, verify_pool
from pool.verify_report import SCHEMA, SCHEMA_VERSION, VerifyReport

REPO = Path(__file__).resolve().parents[1]
ANSI = "\033["


# -- helpers ------------------------------------------------------------------------------------------
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(path: Path, models: dict, heads: dict | None = None) -> Path:
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads or {}}), path)
    return path


def flip_byte_in_zip_record(path: Path) -> str:
    """Flip the lowest bit of one float in the middle of the largest data record; return its name."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    span = member_spans(path.read_bytes())[info.filename]
    with open(path, "r+b") as f:
        offset = span.start + (info.file_size // 2) // 4 * 4
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))  # a mantissa bit: the weight changes, stays finite
    return info.filename


class Evil:
    """Pickles to a call of os.system: the file names posix.system (never run by pool)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tree_copy(synth_tree, tmp_path_factory) -> Path:
    """A writable copy of the session synth tree's files (convert --tree writes beside them)."""
    dst = tmp_path_factory.mktemp("tree_copy") / "ckpts"
    shutil.copytree(synth_tree.root / "tiny", dst / "tiny")
    return dst


@pytest.fixture(scope="session")
def converted_tree(tree_copy) -> tuple[Path, int, str, str]:
    """convert --tree --force on the copy (the synth tree already holds a foreign
    Cars/finetuned.safetensors, so --force is needed); returns (config, code, out, err)."""
    sources = {p: sha256(p) for p in tree_copy.rglob("*.pt")}
    code = main(["convert", "--tree", str(tree_copy), "--force"])
    assert all(sha256(p) == digest for p, digest in sources.items()), "a source file changed"
    return tree_copy / "pool.safetensors.yaml", code, "", ""


# -- verify -------------------------------------------------------------------------------------------
def test_verify_embedded_default_exits_0(capsys):
    code, out, err = run(capsys, "verify")
    assert code == 0, out + err
    assert "embedded default" in out
    assert "all 11 entries passed (7/7 models, 4/4 heads)" in out
    assert "integrity  on:" in out  # the integrity pass is the default (issue 23)
    for name in ("_pretrained_", "cars", "dtd", "eurosat", "mnist", "cars_safetensors"):
        assert f"\n  {name} " in out
    for container in ("zip", "legacy", "pickle", "safetensors"):
        assert container in out
    assert ANSI not in out  # captured stdout is no terminal: no colour
    no_traceback(err)


def test_verify_json_report(capsys, synth_tree):
    code, out, err = run(capsys, "verify", synth_tree.config, "--json", "-")
    assert code == 0, err
    report = json.loads(out)  # stdout holds the JSON alone
    assert report["schema"] == SCHEMA and report["schema_version"] == SCHEMA_VERSION
    assert report["ok"] is True and report["integrity_checked"] is True  # the default (issue 23)
    assert set(report["versions"]) >= {"pool", "torch", "open_clip", "python"}
    entries = {(e["section"], e["name"]): e for e in report["entries"]}
    assert len(entries) == 11
    pre = entries[("models", "_pretrained_")]
    assert pre["container"] == "zip" and pre["task_vector"] is None and pre["stage"] is None
    assert pre["forward"]["output"] == [2, synth.TINY.embed_dim] and pre["forward"]["finite"]
    timings = pre["timings"]
    assert pre["params"] > 0 and timings["load_s"] > 0 and timings["weights_s"] > 0 and timings["forward_s"] > 0
    assert timings["task_vector_s"] is None  # _pretrained_ has no task vector
    assert timings["integrity_s"] > 0  # the integrity pass is the default (issue 23), timed apart
    assert timings["total_s"] == pytest.approx(timings["integrity_s"] + timings["load_s"] + timings["weights_s"]
                                               + timings["forward_s"])
    assert pre["architecture"]["description"] == synth.TINY.describe()
    assert pre["paired_head"] is None and pre["head"] is None
    for name in ("cars", "dtd", "eurosat", "mnist"):
        model = entries[("models", name)]
        assert model["task_vector"]["against"] == "_pretrained_" and model["task_vector"]["l2_norm"] > 0
        assert model["timings"]["task_vector_s"] > 0
        assert model["paired_head"] == f"classification_heads.{name}"
        head = entries[("classification_heads", name)]
        assert head["ok"] and head["head"]["paired_with"] == f"models.{name}"
        assert head["head"]["input_dim"] == synth.TINY.embed_dim and head["paired_head"] is None
    # the JSON reads back into the same typed report
    back = VerifyReport.from_dict(report)
    assert back.as_dict() == report
    # cars_state_dict/cars_safetensors hold the same weights as cars: same task vector
    cars = entries[("models", "cars")]["task_vector"]["l2_norm"]
    assert entries[("models", "cars_safetensors")]["task_vector"]["l2_norm"] == pytest.approx(cars)


def test_verify_streams_one_line_per_entry_to_stderr_when_it_is_no_terminal(capsys, synth_tree):
    code, out, err = run(capsys, "verify", synth_tree.config)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("verify [")]
    assert len(lines) == 11
    assert lines[0].startswith("verify [ 1/11] PASS models._pretrained_: integrity ")  # the default (issue 23)
    assert " load " in lines[0]
    assert "weights " in lines[0] and "forward " in lines[0]
    assert lines[-1].startswith("verify [11/11] PASS ")
    assert any(" task vector " in line for line in lines)
    # and the JSON-on-stdout form keeps stdout clean while stderr still streams
    code, out, err = run(capsys, "verify", synth_tree.config, "--json", "-")
    assert json.loads(out)["ok"] and len([x for x in err.splitlines() if x.startswith("verify [")]) == 11


def test_verify_pool_reports_each_entry_as_soon_as_it_is_done(synth_tree):
    pool, models, heads = prepare_pool(synth_tree.config)
    events: list[str] = []
    report = verify_pool(pool, models, heads, config_label="t", progress=lambda label: events.append("start " + label),
                         on_result=lambda r: events.append("done " + r.label))
    labels = [e.label for e in report.entries]
    # every entry is reported before the next one starts, in report order
    assert events == [x for label in labels for x in ("start " + label, "done " + label)]


def test_verify_failure_stage_and_streamed_line_name_the_failure(capsys, synth_tree, tmp_path):
    truncated = tmp_path / "finetuned.pt"
    data = synth_tree.files["dtd"].read_bytes()  # a legacy file
    truncated.write_bytes(data[: len(data) // 2])
    config = write_config(tmp_path / "pool.yaml", {"dtd": str(truncated)})
    code, _, err = run(capsys, "verify", config)
    assert code == 1
    line = next(x for x in err.splitlines() if x.startswith("verify ["))
    assert line.startswith("verify [1/1] FAIL models.dtd: load: ") and str(truncated) in line


def test_verify_corrupted_file_fails_and_reports_the_others(capsys, synth_tree, tmp_path):
    truncated = tmp_path / "finetuned.pt"
    data = synth_tree.files["cars"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    config = write_config(tmp_path / "pool.yaml", {
        "_pretrained_": str(synth_tree.files["_pretrained_"]),
        "cars": str(truncated),
        "dtd": str(synth_tree.files["dtd"]),
    }, {"cars": str(synth_tree.files["head_cars"]), "dtd": str(synth_tree.files["head_dtd"])})
    json_path = tmp_path / "report.json"
    code, out, err = run(capsys, "verify", config, "--json", json_path)
    assert code == 1
    models_table = out.split("\nmodels (3)\n")[1].split("\n\n")[0]
    rows = {line.split()[0]: line for line in models_table.splitlines()}
    assert rows["cars"].rstrip().endswith("FAIL")
    assert rows["dtd"].rstrip().endswith("PASS") and rows["_pretrained_"].rstrip().endswith("PASS")
    assert "models.cars: integrity:" in out and str(truncated) in out  # the integrity pass: the default
    assert "1 of 5 entries failed" in out
    report = json.loads(json_path.read_text())
    assert report["ok"] is False and report["summary"]["failed"] == ["models.cars"]
    failed = next(e for e in report["entries"] if e["name"] == "cars" and e["section"] == "models")
    assert failed["error_type"] == "CorruptCheckpointError" and failed["stage"] == "integrity"
    code, out, _ = run(capsys, "verify", config, "--no-integrity")  # without it, the load refuses the file
    assert code == 1 and "models.cars: load:" in out and str(truncated) in out
    # the head paired with the broken model is still checked, alone
    head = next(e for e in report["entries"] if e["name"] == "cars" and e["section"] != "models")
    assert head["ok"] and "checked alone" in head["head"]["note"]
    no_traceback(err)


def test_verify_mismatched_model_name_names_the_architecture(capsys, synth_tree, tmp_path):
    config = write_config(tmp_path / "pool.yaml", {
        "_pretrained_": str(synth_tree.files["_pretrained_"]),
        "cars": {"model_name": "ViT-B-32", "pickle_path": str(synth_tree.files["cars"])},
    })
    code, out, err = run(capsys, "verify", config)
    assert code == 1
    assert "? (config: ViT-B-32)" in out
    message = " ".join(out.split())
    assert "models.cars: load:" in message
    assert "weights are a custom ViT (patch 8, width 128, 2 layers, 32 px, embed 32)" in message
    assert "config says ViT-B-32 (patch 32, width 768, 12 layers, 224 px, embed 512)" in message
    assert "1 of 2 entries failed" in out
    no_traceback(err)


def test_verify_head_that_does_not_fit_its_encoder_fails(capsys, synth_tree, write_head, tmp_path):
    head_path, _ = write_head("zip", num_classes=3, embed_dim=16)
    config = write_config(tmp_path / "pool.yaml", {"cars": str(synth_tree.files["cars"])},
                          {"cars": str(head_path)})
    code, out, _ = run(capsys, "verify", config, "--json", "-")
    assert code == 1
    report = json.loads(out)
    head = next(e for e in report["entries"] if e["section"] == "classification_heads")
    assert not head["ok"] and head["error"].startswith("pairing:")
    assert "16-dim" in head["error"] and "32-dim" in head["error"]
    model = next(e for e in report["entries"] if e["section"] == "models")
    assert model["ok"] and model["task_vector"]["skipped"] == "the pool has no _pretrained_"
    assert model["task_vector"]["l2_norm"] is None


@pytest.mark.parametrize("content, message", [
    (None, "pool config not found"),
    ("models: [\n", "not a valid YAML pool config"),
    ("models:\n  a: {pickle_path: x.pt, bogus: 1}\n", "unknown keys ['bogus']"),
    ("models:\n  a: {model_name: ViT-Q-99, pickle_path: x.pt}\n", "model_name 'ViT-Q-99'"),
    ("models: {}\n", "nothing to verify"),
])
def test_verify_config_errors_exit_2(capsys, tmp_path, content, message):
    config = tmp_path / "pool.yaml"
    if content is not None:
        config.write_text(content)
    code, out, err = run(capsys, "verify", config)
    assert code == 2
    assert out == ""
    assert message in " ".join(err.split())
    assert err.startswith("openclip-pool verify: error: ")
    no_traceback(err)


def test_verify_usage_errors_exit_2(capsys, tmp_path):
    assert run(capsys, "verify", "--device", "not-a-device")[0] == 2
    code, _, err = run(capsys, "verify", tmp_path)  # a folder, not a YAML file
    assert code == 2 and "is a folder" in " ".join(err.split())
    code, _, err = run(capsys, "verify", "--json", tmp_path / "missing" / "r.json")
    assert code == 2 and "does not exist" in " ".join(err.split())


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "verify", tmp_path / "missing.yaml", "--debug")
    assert code == 2 and "Traceback" in err and "pool config not found" in err


def test_integrity_catches_flipped_bits_that_no_integrity_misses(capsys, synth_tree, tmp_path):
    damaged = tmp_path / "finetuned.pt"
    shutil.copyfile(synth_tree.files["cars"], damaged)
    member = flip_byte_in_zip_record(damaged)
    config = write_config(tmp_path / "pool.yaml", {
        "_pretrained_": str(synth_tree.files["_pretrained_"]),
        "cars": str(damaged),
        "dtd": str(synth_tree.files["dtd"]),  # legacy: no checksums to check
        "cars_safetensors": {"state_dict_path": str(synth_tree.files["cars_safetensors"])},
    })
    code, out, _ = run(capsys, "verify", config, "--no-integrity")
    assert code == 0, out  # the damage loads silently: exactly why the integrity pass is the default
    assert "integrity  off (--no-integrity)" in out

    code, out, err = run(capsys, "verify", config, "--json", "-")
    assert code == 1, err
    report = json.loads(out)
    entries = {e["name"]: e for e in report["entries"]}
    cars = entries["cars"]
    assert not cars["ok"] and cars["error"].startswith("integrity:")
    assert "CRC32" in cars["error"] and member in cars["error"]
    assert cars["timings"]["load_s"] is None and cars["stage"] == "integrity"  # refused before loading
    assert entries["_pretrained_"]["integrity"]["checked"] is True
    assert entries["dtd"]["ok"] and entries["dtd"]["integrity"]["checked"] is False
    assert "header and offsets ok" in entries["cars_safetensors"]["integrity"]["detail"]


def test_integrity_checks_safetensors_offsets(synth_tree, tmp_path):
    path = tmp_path / "x.safetensors"
    data = synth_tree.files["cars_safetensors"].read_bytes()
    path.write_bytes(data)
    assert check_integrity(path).checked
    path.write_bytes(data + b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="trailing bytes"):
        check_integrity(path)
    path.write_bytes(data[:-16])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        check_integrity(path)


# -- inspect ------------------------------------------------------------------------------------------
def test_inspect_encoder(capsys, synth_tree):
    path = synth_tree.files["dtd"]
    code, out, err = run(capsys, "inspect", path)
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["sha256"] == sha256(path)
    assert fields["container"].startswith("legacy")
    assert fields["root"] == "type   src.modeling.ImageEncoder"
    assert fields["kind"].startswith("encoder: a custom ViT (patch 8, width 128, 2 layers, 32 px, embed 32, QuickGELU)")
    assert fields["tensors"].startswith("38 (float32 x38)")
    assert "MiB" in fields["size"]
    assert "all allowed" in fields["globals"]
    assert "  src.modeling.ImageEncoder" in out and "  open_clip.transformer.QuickGELU" in out


def test_inspect_head_json(capsys, synth_tree):
    code, out, _ = run(capsys, "inspect", synth_tree.files["head_cars"], "--json")
    assert code == 0
    info = json.loads(out)
    assert info["kind"] == "head" and info["description"] == "head: 5 classes x 32, normalize=True"
    assert info["tensors"] == 2 and info["parameters"] == 5 * 32 + 5 and info["dtypes"] == {"float32": 2}
    assert info["unsafe_globals"] == [] and info["sha256"] == sha256(synth_tree.files["head_cars"])


@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_inspect_hostile_file_lists_unsafe_global_and_runs_nothing(capsys, tmp_path, container):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    if container == "pickle":
        path.write_bytes(pickle.dumps(Evil(marker)))  # no tensors at all
    else:
        torch.save({"weight": torch.ones(2, 2), "payload": Evil(marker)}, path)
    code, out, err = run(capsys, "inspect", path)
    assert code == 1
    assert "posix.system  REFUSED" in out
    assert "1 REFUSED" in out
    assert "names the global 'posix.system', which is on no allowlist" in " ".join(err.split())
    assert not marker.exists()
    no_traceback(err)


def test_inspect_unreadable_or_missing_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", tmp_path / "nope.pt")
    assert code == 2 and "checkpoint not found" in err
    html = tmp_path / "download.pt"
    html.write_text("<!DOCTYPE html><html><body>404</body></html>")
    code, _, err = run(capsys, "inspect", html)
    assert code == 2 and "HTML" in err
    no_traceback(err)


# -- convert ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["zip", "legacy", "pickle", "state_dict"])
def test_convert_encoder_round_trip_is_bit_identical(capsys, write_encoder, tmp_path, container):
    src, _ = write_encoder(container)
    before = sha256(src)
    dst = tmp_path / "out" / "enc.safetensors"
    dst.parent.mkdir()
    code, out, err = run(capsys, "convert", src, dst)
    assert code == 0, err
    assert "read back bit-identical" in out
    assert sha256(src) == before
    original = ImageEncoder.load(src).state_dict()
    converted = read_checkpoint(dst)
    assert set(converted.state_dict) == set(original)  # ImageEncoder keys: model.visual...
    for key, value in original.items():
        assert torch.equal(converted.state_dict[key], value), key
    meta = converted.metadata
    assert meta["format"] == "pt" and meta["pool.kind"] == "encoder"
    assert meta["pool.source_sha256"] == before and meta["pool.source_name"] == src.name
    assert meta["pool.architecture"] == synth.TINY.describe().removesuffix(", QuickGELU") + ", QuickGELU"
    assert not [p for p in dst.parent.iterdir() if p.name != dst.name]  # no temporary left behind


def test_convert_head_keeps_normalize(capsys, write_head, tmp_path):
    src, original = write_head("pickle", num_classes=4, normalize=False)
    dst = tmp_path / "head.safetensors"
    code, out, _ = run(capsys, "convert", src, dst)
    assert code == 0 and "normalize=false" in out
    ckpt = read_checkpoint(dst)
    assert set(ckpt.state_dict) == {"weight", "bias"}
    assert ckpt.metadata["normalize"] == "false" and ckpt.metadata["pool.kind"] == "head"
    head = ClassificationHead.load(dst)
    assert head.normalize is False
    assert torch.equal(head.weight, original.weight) and torch.equal(head.bias, original.bias)


def test_convert_refuses_existing_destination_without_force(capsys, write_encoder, tmp_path):
    src, _ = write_encoder("zip")
    dst = tmp_path / "enc.safetensors"
    dst.write_bytes(b"keep me")
    code, out, err = run(capsys, "convert", src, dst)
    assert code == 2 and out == ""
    assert "exists" in err and "--force" in err
    assert dst.read_bytes() == b"keep me"
    code, _, err = run(capsys, "convert", src, dst, "--force")
    assert code == 0, err
    assert read_checkpoint(dst).metadata["pool.kind"] == "encoder"


def test_convert_failures(capsys, tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    code, _, err = run(capsys, "convert", evil, tmp_path / "evil.safetensors")
    assert code == 1 and "posix.system" in err and not marker.exists()
    assert not (tmp_path / "evil.safetensors").exists()
    code, _, err = run(capsys, "convert", tmp_path / "nope.pt", tmp_path / "x.safetensors")
    assert code == 2 and "checkpoint not found" in err
    assert run(capsys, "convert", evil)[0] == 2  # SRC without DST
    assert run(capsys, "convert", evil, tmp_path / "y", "--tree", tmp_path)[0] == 2
    no_traceback(err)


def test_convert_tree_then_verify(capsys, converted_tree, synth_tree, tree_copy):
    config, code, _, _ = converted_tree
    assert code == 0
    text = config.read_text()
    assert text.startswith("# written by `openclip-pool convert --tree`")
    cfg = OmegaConf.load(config)
    assert set(cfg.models) == {"_pretrained_", "cars", "dtd", "eurosat", "mnist"}
    assert set(cfg.classification_heads) == {"cars", "dtd", "eurosat", "mnist"}
    assert str(cfg.models.cars.state_dict_path).endswith("tiny/Cars/finetuned.safetensors")
    assert str(cfg.classification_heads.dtd).endswith("tiny/head_DTD.safetensors")
    code, out, err = run(capsys, "verify", config, "--integrity")
    assert code == 0, out + err
    assert "all 9 entries passed" in out

    # the converted pool gives bit-identical state dicts and the same features
    original = OpenCLIPVisionModelPool.from_config(synth_tree.config)
    converted = OpenCLIPVisionModelPool.from_config(config)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in converted.all_model_names:
        a, b = original.load_model(name), converted.load_model(name)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        with torch.no_grad():
            assert torch.equal(a(images), b(images)), name
    for name in converted.classification_head_names:
        a, b = original.load_classification_head(name), converted.load_classification_head(name)
        assert a.normalize == b.normalize
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)

    # a second run is idempotent: everything read back and kept as up to date
    code, out, _ = run(capsys, "convert", "--tree", tree_copy)
    assert code == 0 and "0 converted, 10 up to date" in out


def test_convert_tree_on_a_fresh_synth_tree_keeps_a_destination_holding_the_same_tensors(capsys, synth_tree, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(synth_tree.root / "tiny", root / "tiny")
    kept = root / "tiny" / "Cars" / "finetuned.safetensors"  # written by synth, not by convert
    before = kept.read_bytes()
    code, out, err = run(capsys, "convert", "--tree", root)
    assert code == 0, out + err
    row = next(line for line in out.splitlines() if "tiny/Cars/finetuned.pt " in line)
    assert row.rstrip().endswith("same tensors")
    assert "1 already held the same tensors (kept)" in out
    assert kept.read_bytes() == before
    cfg = OmegaConf.load(root / "pool.safetensors.yaml")
    assert cfg.models.cars.state_dict_path == str(kept.absolute())
    pool = OpenCLIPVisionModelPool.from_config(root / "pool.safetensors.yaml")
    assert torch.equal(pool.load_model("cars").state_dict()["model.visual.proj"],
                       ImageEncoder.load(root / "tiny" / "Cars" / "finetuned.pt").state_dict()["model.visual.proj"])


def test_convert_tree_refuses_foreign_destinations_and_writes_nothing(capsys, synth_tree, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(synth_tree.root / "tiny", root / "tiny")
    other = ImageEncoder.load(root / "tiny" / "DTD" / "finetuned.pt").state_dict()  # not Cars' tensors
    synth.save_state_dict(other, root / "tiny" / "Cars" / "finetuned.safetensors", "safetensors")
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    code, _, err = run(capsys, "convert", "--tree", root)
    assert code == 2
    text = " ".join(err.split())
    assert "Cars/finetuned.safetensors (model." in text and "has different values" in text
    assert "Nothing was written" in text
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_convert_tree_keeps_gelu_encoders_gelu(capsys, tmp_path):
    gelu = replace(synth.TINY, quick_gelu=False)
    root = tmp_path / "ckpts"
    synth.save_module(synth.make_original_encoder(gelu, seed=0), root / "g" / "zeroshot.pt", "zip")
    synth.save_module(synth.make_original_encoder(gelu, seed=1), root / "g" / "Cars" / "finetuned.pt", "legacy")
    synth.save_module(synth.make_original_head(3, gelu.embed_dim), root / "head_Cars.pt", "zip")  # one level up
    code, out, err = run(capsys, "convert", "--tree", root)
    assert code == 0, out + err
    cfg = OmegaConf.load(root / "pool.safetensors.yaml")
    assert cfg.models.cars.quick_gelu is False and cfg.models._pretrained_.quick_gelu is False
    assert str(cfg.classification_heads.cars).endswith("head_Cars.safetensors")
    pool = OpenCLIPVisionModelPool.from_config(root / "pool.safetensors.yaml")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pool.load_model("cars")(images),
                           ImageEncoder.load(root / "g" / "Cars" / "finetuned.pt")(images))


# -- synth --------------------------------------------------------------------------------------------
def test_synth_then_verify(capsys, tmp_path):
    root = tmp_path / "tree"
    code, out, err = run(capsys, "synth", root, "--tasks", "Cars,SVHN")
    assert code == 0, err
    config = root / "pool.yaml"
    assert f"config  {config}" in out and f"openclip-pool verify {config}" in out
    assert (root / "tiny" / "SVHN" / "finetuned.pt").is_file()
    code, out, err = run(capsys, "verify", config)
    assert code == 0, out + err
    assert "all 7 entries passed (5/5 models, 2/2 heads)" in out
    # an existing tree is not overwritten without --force
    code, _, err = run(capsys, "synth", root)
    assert code == 2 and "--force" in err


def test_synth_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys, "synth", tmp_path / "t", "--arch", "ViT-Q-99")
    assert code == 2 and "ViT-Q-99" in err
    code, _, err = run(capsys, "synth", tmp_path / "t", "--tasks", "a/b")
    assert code == 2 and "--tasks" in err
    assert not (tmp_path / "t").exists()


# -- entry points, usage, output ----------------------------------------------------------------------
def test_usage(capsys):
    assert run(capsys, )[0] == 2  # no command
    assert run(capsys, "bogus")[0] == 2
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("verify", "inspect", "convert", "synth"))
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.split() == ["openclip-pool", pool.__version__]
    # the version is written once, in pool/__init__.py: the installed metadata reads it from there
    assert importlib.metadata.version("openclip-pool") == pool.__version__


def test_human_formats():
    assert human_size(512) == "512 B" and human_size(1536) == "1.5 KiB" and human_size(3 * 2**20) == "3.0 MiB"
    assert human_time(0.0123) == "12 ms" and human_time(1.234) == "1.23 s" and human_time(75) == "1 min 15 s"
    assert human_count(87_849_216) == "87.85 M" and human_count(198) == "198"


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Style(Tty()).ok("PASS").startswith(ANSI)
    monkeypatch.setenv("NO_COLOR", "1")
    assert Style(Tty()).ok("PASS") == "PASS"


def _subprocess(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_subprocess_python_m_pool_verify(synth_tree):
    proc = _subprocess([sys.executable, "-m", "pool", "verify", str(synth_tree.config), "--json", "-"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["models_passed"] == 7


def test_subprocess_console_script_failure_paths(tmp_path):
    script = Path(sys.executable).with_name("openclip-pool")
    if not script.exists():
        pytest.skip(f"console script not installed at {script}")
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    proc = _subprocess([str(script), "inspect", str(evil)])
    assert proc.returncode == 1, proc.stderr
    assert "posix.system" in proc.stdout and "openclip-pool inspect: error:" in proc.stderr
    assert not marker.exists()
    no_traceback(proc.stderr)
    proc = _subprocess([str(script), "verify", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2
    assert proc.stdout == "" and "pool config not found" in proc.stderr
    no_traceback(proc.stderr)

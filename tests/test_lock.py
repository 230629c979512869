"""``python -m pool lock CONFIG`` and ``verify --locked`` (issue 23): a stable lock file per pool,
and every drift from it (a replaced file, an entry only the config or the lock has) a named failure
with the fix; the same for ``pytest --openclip-pool-locked``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pool import CorruptCheckpointError, LockMismatchError, OpenCLIPVisionModelPool, synth
from pool.cli import main
from pool.containers.zipfmt import parse_zip
from pool.integrity import check_integrity
from pool.lock import LOCK_NAME, LOCK_SCHEMA, tensors_digest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("PYTEST_ADDOPTS", None)


def write_config(path: Path, models: dict, heads: dict | None = None) -> Path:
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads or {}}), path)
    return path


@pytest.fixture()
def tree(tmp_path) -> Path:
    """A small pool in every container: zip, legacy, plain pickle, safetensors, a head; returns its config."""
    root = tmp_path / "tree"
    root.mkdir()
    synth.save_module(synth.make_original_encoder(seed=0), root / "zeroshot.pt", "zip")
    synth.save_module(synth.make_original_encoder(seed=1), root / "cars.pt", "zip")
    synth.save_module(synth.make_original_encoder(seed=2), root / "dtd.pt", "legacy")
    synth.save_module(synth.make_original_encoder(seed=3), root / "eurosat.pt", "pickle")
    synth.save_state_dict(synth.make_original_encoder(seed=4).state_dict(), root / "mnist.safetensors", "safetensors")
    synth.save_module(synth.make_original_head(5, synth.TINY.embed_dim, seed=1), root / "head_cars.pt", "zip")
    return write_config(root / "pool.yaml", {
        "_pretrained_": str(root / "zeroshot.pt"),
        "cars": str(root / "cars.pt"), "dtd": str(root / "dtd.pt"), "eurosat": str(root / "eurosat.pt"),
        "mnist": {"state_dict_path": str(root / "mnist.safetensors")}}, {"cars": str(root / "head_cars.pt")})


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lock_then_verify_locked_passes_and_the_lock_is_stable(capsys, tree):
    code, out, err = run_cli(capsys, "lock", tree)
    assert code == 0, err
    lock = tree.parent / LOCK_NAME
    assert f"{lock} written: 6 entries locked" in out
    first = lock.read_bytes()
    data = json.loads(first)
    assert data["schema"] == LOCK_SCHEMA and data["config"] == "pool.yaml"
    assert list(data["entries"]) == sorted(data["entries"])
    assert first.decode().startswith('{\n  "config"')  # indented, keys sorted: diff-friendly
    cars = data["entries"]["models.cars"]
    assert cars["path"] == "cars.pt"  # relative to the lock's folder: the checkout can move
    assert cars["size"] == (tree.parent / "cars.pt").stat().st_size
    assert cars["sha256"] == hashlib.sha256((tree.parent / "cars.pt").read_bytes()).hexdigest()
    assert cars["container"] == "zip" and cars["architecture"].startswith("ViT p8 w128 L2 32px")
    assert cars["globals"]["torch._utils._rebuild_tensor_v2"] == "allowed"
    assert cars["tensors"]["count"] > 0 and len(cars["tensors"]["sha256"]) == 64
    assert {e["container"] for e in data["entries"].values()} == {"zip", "legacy", "pickle", "safetensors"}
    assert data["entries"]["models.mnist"]["globals"] == {}
    assert data["entries"]["classification_heads.cars"]["architecture"] == "head 5 classes x 32, normalize=True"

    code, out, _ = run_cli(capsys, "lock", tree)  # written twice for the same files: byte-identical
    assert code == 0 and "unchanged" in out
    lock.unlink()
    assert run_cli(capsys, "lock", tree)[0] == 0
    assert lock.read_bytes() == first

    code, out, err = run_cli(capsys, "verify", tree, "--locked")
    assert code == 0, out + err
    assert f"locked     on: every entry checked against {lock}" in out
    code, out, _ = run_cli(capsys, "verify", tree, "--locked", "--json", "-")
    report = json.loads(out)
    assert report["lock_file"] == str(lock)
    assert all(e["timings"]["lock_s"] is not None for e in report["entries"])


def test_a_replaced_file_fails_verify_locked_naming_what_changed(capsys, tree):
    assert run_cli(capsys, "lock", tree)[0] == 0
    cars = tree.parent / "cars.pt"
    synth.save_module(synth.make_original_encoder(seed=99), cars, "zip")  # same architecture, other weights
    code, out, err = run_cli(capsys, "verify", tree, "--locked", "--json", "-")
    assert code == 1, err
    entries = {e["name"]: e for e in json.loads(out)["entries"] if e["section"] == "models"}
    bad = entries["cars"]
    assert not bad["ok"] and bad["stage"] == "lock" and bad["error_type"] == "LockMismatchError"
    assert "models.cars drifted from the lock file" in bad["error"]
    assert "sha256 changed" in bad["error"] and "tensors digest changed" in bad["error"]
    assert "architecture" not in bad["error"]  # same architecture: not named
    assert f"python -m pool lock {tree}" in bad["error"]
    assert [e["name"] for e in entries.values() if not e["ok"]] == ["cars"]

    code, out, _ = run_cli(capsys, "verify", tree)  # without --locked the new weights pass
    assert code == 0
    assert run_cli(capsys, "lock", tree)[0] == 0  # approved
    assert run_cli(capsys, "verify", tree, "--locked")[0] == 0


def test_entries_only_the_config_or_only_the_lock_has_fail(capsys, tree, tmp_path):
    assert run_cli(capsys, "lock", tree)[0] == 0
    cfg = OmegaConf.load(tree)
    cfg.models["gtsrb"] = cfg.models["cars"]
    del cfg.models["dtd"]
    OmegaConf.save(cfg, tree)
    code, out, err = run_cli(capsys, "verify", tree, "--locked", "--json", "-")
    assert code == 1, err
    failed = {e["name"]: e["error"] for e in json.loads(out)["entries"] if not e["ok"]}
    assert set(failed) == {"gtsrb", "dtd"}
    assert "models.gtsrb is in the config but not in the lock file" in failed["gtsrb"]
    assert "models.dtd is in the lock file" in failed["dtd"] and "but not in the config" in failed["dtd"]
    assert all("python -m pool lock" in text for text in failed.values())


def test_locked_needs_a_lock_file_and_a_config(capsys, tree, tmp_path):
    code, _, err = run_cli(capsys, "verify", tree, "--locked")
    assert code == 2 and "lock file not found" in err and "python -m pool lock" in err
    code, _, err = run_cli(capsys, "verify", "--locked")
    assert code == 2 and "--locked needs a CONFIG" in err
    elsewhere = tmp_path / "elsewhere.lock"
    assert run_cli(capsys, "lock", tree, "--lock", elsewhere)[0] == 0
    assert not (tree.parent / LOCK_NAME).exists()
    code, out, err = run_cli(capsys, "verify", tree, "--lock", elsewhere)  # --lock PATH implies --locked
    assert code == 0, out + err
    assert str(elsewhere) in out


def test_lock_refuses_to_approve_a_failing_pool(capsys, tree):
    cars = tree.parent / "cars.pt"
    cars.write_bytes(cars.read_bytes()[:100])
    code, _, err = run_cli(capsys, "lock", tree)
    assert code == 1 and "models.cars" in err and "not written" in err
    assert not (tree.parent / LOCK_NAME).exists()


def test_tensors_digest_covers_names_dtypes_shapes_and_bytes():
    import torch

    a = torch.nn.Linear(3, 2)
    base = tensors_digest(a)
    assert base == tensors_digest(a) and base["count"] == 2
    with torch.no_grad():
        a.weight[0, 0] += 1
    assert tensors_digest(a)["sha256"] != base["sha256"]
    assert tensors_digest(a.to(torch.float64))["sha256"] != tensors_digest(a.to(torch.float32))["sha256"]


def test_a_mismatch_is_a_public_error():
    import pool
    import pool.errors

    assert pool.LockMismatchError is pool.errors.LockMismatchError is LockMismatchError
    assert issubclass(LockMismatchError, pool.PoolError)


def test_pytest_locked_items_fail_a_replaced_file(capsys, tree, tmp_path):
    assert run_cli(capsys, "lock", tree)[0] == 0
    project = tmp_path / "project"
    project.mkdir()
    args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "cars",
            "--openclip-pool-verify", str(tree), "--openclip-pool-locked"]
    proc = subprocess.run(args, cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    synth.save_module(synth.make_original_encoder(seed=99), tree.parent / "cars.pt", "zip")
    proc = subprocess.run(args, cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "models.cars failed at lock" in proc.stdout and "sha256 changed" in proc.stdout
    assert "tensors digest changed" in proc.stdout and "python -m pool lock" in proc.stdout
    assert "1 failed" in proc.stdout and "1 passed" in proc.stdout  # its head still matches


@pytest.mark.parametrize("digest", [False, True])
def test_one_pass_gives_the_file_sha256_and_catches_a_flipped_byte(write_encoder, digest) -> None:
    """The zip pass (`pool.containers.zipfmt.check_crcs`) hashes every byte of the file while it
    checks the members' CRC32s: the digest is the file's own, and a flipped byte still fails."""
    path, _ = write_encoder("zip")
    result = check_integrity(path, digest=digest)
    assert result.checked
    assert result.sha256 == (hashlib.sha256(path.read_bytes()).hexdigest() if digest else None)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the largest member's tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        check_integrity(path, digest=digest)


@pytest.mark.parametrize("digest", [False, True])
def test_every_member_is_checked_by_both_passes(write_encoder, digest) -> None:
    """The CRC32s computed several members at a time (no digest) and in the one pass that also
    hashes the file (digest) both name the member whose byte flipped, whichever it is."""
    path, _ = write_encoder("zip")
    original = path.read_bytes()
    members = [m for m in parse_zip(original, str(path)).members.values() if m.size]
    assert len(members) > 3
    for member in members:
        data = bytearray(original)
        data[member.offset + member.size // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match=f"zip member {member.name} "):
            check_integrity(path, digest=digest)
    path.write_bytes(original)
    assert check_integrity(path, digest=digest).checked


def test_lock_takes_each_files_globals_from_its_load_not_a_second_read(tmp_path, monkeypatch) -> None:
    # the globals a lock records come from the read the load already did: no file is parsed again,
    # and they are what a read of the file itself lists
    from pool import verify_checks
    from pool.checkpoint import read_checkpoint

    tree = synth.write_tree(tmp_path / "tree", tasks=["Cars", "DTD", "EuroSAT"])  # zip, legacy, plain pickle

    def second_read(*args, **kwargs):
        raise AssertionError(f"the file was read a second time for its globals: {args[0]}")

    monkeypatch.setattr(verify_checks, "read_checkpoint", second_read)
    assert main(["lock", str(tree.config)]) == 0
    locked = json.loads((tree.config.parent / LOCK_NAME).read_text())["entries"]
    pool = OpenCLIPVisionModelPool.from_config(tree.config)
    for section, names in (("models", pool.all_model_names), ("classification_heads", pool.classification_head_names)):
        for name in names:
            path = pool.entry(name, section).path
            listed = read_checkpoint(path, map_location="meta", cache_dir=False).globals
            assert locked[f"{section}.{name}"]["globals"] == {str(g): g.verdict for g in listed}, name
    assert main(["verify", str(tree.config), "--locked"]) == 0

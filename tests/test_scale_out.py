"""Verification that scales out (issue 13): one pytest item per pool entry (JUnit XML, -k, -m,
pytest-xdist), verify sharded across torchrun ranks, and the sharded iteration API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool import ConfigError, OpenCLIPVisionModelPool, synth
from pool.sharding import shard_units
from pool.verify import prepare_pool, shard_entries, verify_order

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("PYTEST_ADDOPTS", None)


@pytest.fixture(scope="module")
def broken_tree(tmp_path_factory) -> tuple[Path, list[str]]:
    """A synth tree whose DTD encoder (a legacy file) is truncated; returns (config, all labels)."""
    root = tmp_path_factory.mktemp("scale_out")
    tree = synth.write_tree(root / "tree")
    dtd = tree.files["dtd"]
    dtd.write_bytes(dtd.read_bytes()[: dtd.stat().st_size // 2])
    _, models, heads = prepare_pool(tree.config)
    return tree.config, verify_order(models, heads)


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


# -- one pytest item per entry ---------------------------------------------------------------------------
def test_pytest_items_per_entry_with_xdist_and_junit(broken_tree, tmp_path):
    """From a downstream project's own folder: every entry an item (ids = labels), exactly the broken
    one fails with its report, JUnit XML lists them all, and pytest-xdist runs them on 2 workers."""
    config, labels = broken_tree
    project = tmp_path / "downstream"
    project.mkdir()
    junit = tmp_path / "junit.xml"
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-rA",
                "--openclip-pool-verify", os.path.relpath(config, project), f"--junitxml={junit}"], project)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    assert sorted(cases) == sorted(labels)
    failed = sorted(name for name, case in cases.items() if case.find("failure") is not None)
    assert failed == ["models.dtd"]
    message = cases["models.dtd"].find("failure").text
    assert "models.dtd failed at load" in message and "finetuned.pt" in message and "legacy" in message
    assert "2 workers" in proc.stdout or "created: 2/2 workers" in proc.stdout


def test_pytest_items_from_the_ini_option_with_k_and_m_selection(broken_tree, tmp_path):
    config, _ = broken_tree
    project = tmp_path / "downstream"
    project.mkdir()
    (project / "pytest.ini").write_text(f"[pytest]\nopenclip_pool_verify = {config}\n")
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q",
                "-k", "cars and not state", "-m", "pool_form_path"], project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = sorted(line.split("::")[-1] for line in proc.stdout.splitlines() if line.startswith("PASSED"))
    assert passed == ["classification_heads.cars", "models.cars"]
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "-m", "pool_container_legacy"],
               project)
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "models.dtd" in proc.stdout


def test_a_missing_config_is_a_usage_error(tmp_path):
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--openclip-pool-verify", "nope.yaml"],
               tmp_path)
    assert proc.returncode == 4 and "no such pool config file" in proc.stderr


# -- torchrun ------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed beside this Python")
def test_torchrun_sharded_verify_merges_every_rank_and_fails_exactly_the_broken_entry(broken_tree, tmp_path):
    config, labels = broken_tree
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "report.json"
    proc = run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "pool", "verify", str(config),
                "--json", str(out), "--timeout", "120"], tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [f"{e['section']}.{e['name']}" for e in report["entries"]] == labels
    assert {e["rank"] for e in report["entries"]} == {0, 1}
    assert report["summary"]["failed"] == ["models.dtd"] and report["device"] == "cpu x 2 ranks"
    # a model and its head were checked by the same rank
    by_label = {f"{e['section']}.{e['name']}": e for e in report["entries"]}
    for label, entry in by_label.items():
        if label.startswith("classification_heads."):
            assert entry["rank"] == by_label["models." + label.split(".", 1)[1]]["rank"]
    # one merged report, printed once (rank 0); both ranks streamed their own lines
    assert proc.stdout.count("openclip-pool verify") == 1 and "1 of 11 entries failed" in proc.stdout
    assert "[rank 0/2] verify" in proc.stderr and "[rank 1/2] verify" in proc.stderr


# -- sharding ----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 10_000), max_size=30), world=st.integers(1, 6))
def test_shards_cover_every_unit_once_and_balance_the_bytes(sizes, world):
    units = [f"u{i}" for i in range(len(sizes))]
    shards = [shard_units(units, sizes, rank, world) for rank in range(world)]
    assert sorted(u for shard in shards for u in shard) == sorted(units)
    assert all(shard == [u for u in units if u in shard] for shard in shards)  # original order kept
    loads = [sum(sizes[units.index(u)] for u in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes, default=0)
    assert shards == [shard_units(units, sizes, rank, world) for rank in range(world)]  # deterministic


def test_shard_entries_keep_a_model_with_its_head(synth_tree):
    _, models, heads = prepare_pool(synth_tree.config)
    seen = []
    for rank in range(3):
        mine_models, mine_heads = shard_entries(models, heads, rank, 3)
        names = {m.name for m in mine_models}
        assert all(h.name in names for h in mine_heads if any(m.name == h.name for m in models))
        seen += [m.label for m in mine_models] + [h.label for h in mine_heads]
    assert sorted(seen) == sorted(verify_order(models, heads))


def test_named_models_shard(synth_tree):
    pool = OpenCLIPVisionModelPool.from_config(synth_tree.config)
    shards = [[name for name, _ in pool.named_models(shard=(rank, 2))] for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(pool.model_names) and shards[0] and shards[1]
    for bad in ((2, 2), (0, 0), (-1, 2), ("0", 2), (0,)):
        with pytest.raises(ConfigError, match="shard"):
            next(pool.named_models(shard=bad))


def test_a_shard_without_pretrained_decides_as_one_process_would(tmp_path):
    """_pretrained_ loads but computes NaN: one process skips the task vectors; a shard (or a
    pytest item) that loads _pretrained_ only for its task vectors must skip them too."""
    import torch

    from pool.verify import EntryChecker

    bad = synth.make_original_encoder(seed=0)
    with torch.no_grad():
        bad.model.visual.proj.fill_(float("nan"))
    base = synth.save_module(bad, tmp_path / "zeroshot.pt", "zip")
    tuned = synth.save_module(synth.make_original_encoder(seed=1), tmp_path / "tuned.pt", "zip")
    config = tmp_path / "pool.yaml"
    config.write_text(f"models:\n  _pretrained_: {base}\n  cars: {tuned}\n")
    result = EntryChecker(*prepare_pool(config)).check("models.cars")
    assert result.ok and result.task_vector.skipped == "_pretrained_ did not pass its checks"


def test_pytest_items_config_errors_are_usage_errors_and_ini_paths_follow_the_ini_file(broken_tree, tmp_path):
    config, _ = broken_tree
    project = tmp_path / "downstream"
    (project / "sub").mkdir(parents=True)
    bad = project / "bad.yaml"
    bad.write_text("classification_head:\n  a: x.pt\nmodels: {}\n")
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--openclip-pool-verify", str(bad)], project)
    assert proc.returncode == 4 and "INTERNALERROR" not in proc.stdout + proc.stderr
    assert "did you mean 'classification_heads'" in proc.stderr
    shutil.copy(config, project / "pool.yaml")  # its entries are absolute paths
    (project / "pytest.ini").write_text("[pytest]\nopenclip_pool_verify = pool.yaml\n")
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "cars and not state"],
               project / "sub")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout

"""The gate's defaults (issue 23): the integrity pass on by default in verify, its pytest items and
torchrun (``--no-integrity`` skips it, ``--integrity`` is a no-op), its cost timed apart, the
header saying what is on, Ctrl-C giving a partial report (exit 130), and JUnit XML that names the
config and shows each entry's report alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pool import synth
from pool.cli import main
from pool.containers.zipfmt import parse_zip
from pool.integrity import check_integrity

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("PYTEST_ADDOPTS", None)


def write_config(path: Path, models: dict, heads: dict | None = None) -> Path:
    OmegaConf.save(OmegaConf.create({"models": models, "classification_heads": heads or {}}), path)
    return path


def flip_16_bytes(path: Path) -> str:
    """Flip the lowest bit of 16 bytes in the middle of the largest tensor record of a torch zip
    (one mantissa bit of 16 floats: the weights change and stay finite); returns the member's name."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    member = parse_zip(path.read_bytes(), str(path)).members[info.filename]
    with open(path, "r+b") as f:
        for k in range(16):
            offset = member.offset + (info.file_size // 2) // 4 * 4 + 4 * k
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x01]))
    return info.filename


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, str]:
    """A pool of a good zip, a damaged zip (16 bytes flipped in a tensor) and a legacy file."""
    root = tmp_path_factory.mktemp("damaged")
    synth.save_module(synth.make_original_encoder(seed=0), root / "zeroshot.pt", "zip")
    synth.save_module(synth.make_original_encoder(seed=1), root / "cars.pt", "zip")
    synth.save_module(synth.make_original_encoder(seed=2), root / "dtd.pt", "legacy")
    member = flip_16_bytes(root / "cars.pt")
    config = write_config(root / "pool.yaml", {"_pretrained_": str(root / "zeroshot.pt"),
                                                "cars": str(root / "cars.pt"), "dtd": str(root / "dtd.pt")})
    return config, member


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- integrity on by default -----------------------------------------------------------------------
def test_flipped_bytes_in_a_zip_fail_plain_verify(capsys, damaged):
    config, member = damaged
    code, out, err = run_cli(capsys, "verify", config, "--json", "-")
    assert code == 1, err
    report = json.loads(out)
    assert report["integrity_checked"] is True
    entries = {e["name"]: e for e in report["entries"]}
    cars = entries["cars"]
    assert not cars["ok"] and cars["stage"] == "integrity" and cars["error"].startswith("integrity:")
    assert "CRC32" in cars["error"] and member in cars["error"]
    assert cars["timings"]["load_s"] is None  # refused before loading
    assert entries["_pretrained_"]["ok"] and entries["dtd"]["ok"]
    # the pass's cost is its own timing field, part of the entry's total
    pre = entries["_pretrained_"]["timings"]
    assert pre["integrity_s"] > 0 and pre["total_s"] >= pre["integrity_s"] + pre["load_s"]
    assert entries["dtd"]["integrity"]["checked"] is False  # legacy: nothing to check, no failure


def test_flipped_bytes_in_the_text_report_and_the_ci_lines(capsys, damaged):
    config, member = damaged
    code, out, err = run_cli(capsys, "verify", config)
    assert code == 1
    assert "integrity  on:" in out and "CRC32" in out and member in out
    assert "integrity pass" in out  # the pass's total time in the summary
    assert "integrity" in out.split("models (3)")[1].splitlines()[1]  # a column of its own
    assert "verify [1/3] PASS models._pretrained_: integrity " in err  # and in each CI line


def test_integrity_flag_is_a_no_op_and_no_integrity_skips_the_check(capsys, damaged):
    config, _ = damaged
    code, out, _ = run_cli(capsys, "verify", config, "--integrity", "--json", "-")
    assert code == 1 and json.loads(out)["integrity_checked"] is True
    code, out, _ = run_cli(capsys, "verify", config, "--no-integrity", "--json", "-")
    assert code == 0  # the damage loads silently: what --no-integrity accepts
    report = json.loads(out)
    assert report["integrity_checked"] is False
    assert all(e["integrity"] is None and e["timings"]["integrity_s"] is None for e in report["entries"])
    code, out, _ = run_cli(capsys, "verify", config, "--no-integrity")
    assert code == 0 and "integrity  off (--no-integrity)" in out


def test_the_help_says_what_the_integrity_flags_do(capsys):
    assert main(["verify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-integrity skip the integrity pass" in text
    assert "--integrity accepted for old command lines; does nothing" in text


def test_one_pass_gives_the_crc_check_and_the_files_sha256(damaged, tmp_path):
    import hashlib

    config, _ = damaged
    good = config.parent / "zeroshot.pt"
    res = check_integrity(good, digest=True)
    assert res.checked and res.sha256 == hashlib.sha256(good.read_bytes()).hexdigest()
    assert res.size == good.stat().st_size
    legacy = config.parent / "dtd.pt"
    res = check_integrity(legacy, digest=True, crc=False)
    assert not res.checked and res.sha256 == hashlib.sha256(legacy.read_bytes()).hexdigest()


# -- the header --------------------------------------------------------------------------------------
def test_the_header_says_whether_integrity_cache_and_lock_are_on(capsys, damaged, tmp_path, monkeypatch):
    config, _ = damaged
    monkeypatch.delenv("OPENCLIP_POOL_CACHE_DIR", raising=False)
    _, out, _ = run_cli(capsys, "verify", config)
    header = out.split("\n\n")[0]
    assert "integrity  on:" in header and "cache      off" in header and "locked     off" in header
    monkeypatch.setenv("OPENCLIP_POOL_CACHE_DIR", str(tmp_path / "cache"))
    _, out, _ = run_cli(capsys, "verify", config, "--no-integrity", "--json", "-")
    report = json.loads(out)
    assert report["cache_dir"] == str(tmp_path / "cache") and report["lock_file"] is None
    _, out, _ = run_cli(capsys, "verify", config, "--no-integrity")
    assert f"cache      on: {tmp_path / 'cache'}" in out.split("\n\n")[0]


# -- pytest items ------------------------------------------------------------------------------------
def run_pytest(config: Path, cwd: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    junit = cwd / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           "--openclip-pool-verify", str(config), f"--junitxml={junit}", *extra],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    cases = {case.get("name"): case for case in ET.parse(junit).getroot().iter("testcase")}
    return proc, cases


def test_pytest_items_run_the_integrity_pass_and_junit_names_the_config(damaged, tmp_path):
    config, member = damaged
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    local = project / "configs" / "pool.yaml"
    local.parent.mkdir()
    local.write_text(config.read_text())
    proc, cases = run_pytest(local, project)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(cases) == ["models._pretrained_", "models.cars", "models.dtd"]
    assert {case.get("classname") for case in cases.values()} == {"configs.pool.yaml"}
    assert "configs/pool.yaml::models.cars" in proc.stdout  # the node id names the config
    failure = cases["models.cars"].find("failure")
    text = failure.text or ""
    assert "models.cars failed at integrity" in text and "CRC32" in text and member in text
    assert "Traceback" not in text and "During handling" not in text and "direct cause" not in text
    assert [name for name, case in cases.items() if case.find("failure") is not None] == ["models.cars"]
    assert "Traceback" not in (project / "junit.xml").read_text()  # nor in the entry's JUnit property

    proc, cases = run_pytest(local, project, "--openclip-pool-no-integrity")
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc, cases = run_pytest(local, project, "--tb=long")  # the traceback only when asked for
    assert "Traceback" in cases["models.cars"].find("failure").text


def test_pytest_no_integrity_ini(damaged, tmp_path):
    config, _ = damaged
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(f"[pytest]\nopenclip_pool_verify = {config}\n"
                                        "openclip_pool_no_integrity = true\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"], cwd=project, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 passed" in proc.stdout


# -- Ctrl-C --------------------------------------------------------------------------------------------
_INTERRUPTED = textwrap.dedent("""
    import os, signal, sys, time
    import pool.verify_checks as checks
    from pool.cli import main

    # as in a terminal: a job started in the background (CI) inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real, calls = checks.read_weights, []
    def read_weights(module):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second entry is checked
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        return real(module)
    checks.read_weights = read_weights
    sys.exit(main(["verify", sys.argv[1], "--no-integrity"] + sys.argv[2:]))
""")


def test_ctrl_c_prints_the_entries_done_and_exits_130(damaged, tmp_path):
    config, _ = damaged
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED, str(config)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "_pretrained_" in proc.stdout and "PASS" in proc.stdout
    assert "\n  cars " not in proc.stdout  # not done: not reported
    assert "interrupted after 1 entries" in proc.stdout
    assert "Traceback" not in proc.stderr

    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED, str(config), "--json", "-"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130
    report = json.loads(proc.stdout)
    assert report["interrupted"] is True and report["ok"] is False
    assert [e["name"] for e in report["entries"]] == ["_pretrained_"]

"""pool as a CI gate (issue 23, item 3): the pre-commit hook and the GitHub Action.

* `.pre-commit-hooks.yaml`: hook ``openclip-pool-verify`` (``language: system``: the installed
  console script, no network) runs ``openclip-pool verify pool.yaml`` when a config or checkpoint
  changes. Its command is parsed by the CLI's own parser, and ``pre-commit try-repo`` runs it in a
  temporary git repository holding a synthesized pool: it passes, then fails once a checkpoint is
  truncated, and fails (never passes silently) when the config it names is missing.
* `action.yml`: a composite action whose verify step runs the pytest items with ``--junitxml``; the
  step's own script is run here on a synthesized pool, and the pytest options it uses exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from pool import synth
from pool.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / ".pre-commit-hooks.yaml"
ACTION = REPO / "action.yml"
BIN = Path(sys.executable).parent
PRE_COMMIT = shutil.which("pre-commit", path=str(BIN)) or shutil.which("pre-commit")


def _hook() -> dict:
    hooks = yaml.safe_load(HOOKS.read_text())
    (hook,) = [h for h in hooks if h["id"] == "openclip-pool-verify"]
    return hook


def _env(tmp_path: Path) -> dict[str, str]:
    """A child's environment: this interpreter's scripts first on PATH, this checkout's pool first
    on the import path, pre-commit's store and git's identity kept in ``tmp_path``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PRE_COMMIT_HOME"] = str(tmp_path / "pre-commit-home")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # when the tests run inside a git hook
        env.pop(key, None)
    return env


# -- the hook's manifest ----------------------------------------------------------------------------
def test_hook_runs_verify_on_pool_yaml_offline():
    hook = _hook()
    assert hook["language"] == "system"  # the installed openclip-pool: no pip install of torch by pre-commit
    assert hook["pass_filenames"] is False  # verify takes one config, not the changed files
    program, *argv = hook["entry"].split()
    assert program == "openclip-pool"  # the console script: a pool/ folder in the repository cannot shadow it
    args = build_parser().parse_args([*argv, *hook.get("args", [])])
    assert args.command == "verify" and args.config == "pool.yaml"


@pytest.mark.parametrize("name, runs", [
    ("pool.yaml", True), ("configs/pool.yml", True), ("ckpt/ViT-B-32/Cars/finetuned.pt", True),
    ("head_Cars.pth", True), ("hf/pytorch_model.bin", True), ("a/model.safetensors", True),
    ("README.md", False), ("pool/cli.py", False), ("notes.yaml.txt", False)])
def test_hook_runs_when_a_config_or_checkpoint_changes(name, runs):
    assert bool(re.search(_hook()["files"], name)) is runs


# -- the hook run by pre-commit itself --------------------------------------------------------------
def _git(repo: Path, env: dict[str, str], *argv: str) -> None:
    subprocess.run(["git", *argv], cwd=repo, env=env, check=True, capture_output=True, text=True)


def _try_repo(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PRE_COMMIT, "try-repo", str(REPO), "openclip-pool-verify", "--all-files",
                           "--color", "never"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(PRE_COMMIT is None, reason="pre-commit is not installed (pip install -e '.[test]' brings it)")
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_pre_commit_try_repo_passes_a_good_pool_and_fails_a_broken_one(tmp_path):
    env = _env(tmp_path)
    probe = subprocess.run(["git", "ls-files", "--error-unmatch", HOOKS.name], cwd=REPO, env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{REPO} is no git checkout with {HOOKS.name} committed (pre-commit try-repo clones it)")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, env, "init", "-q")
    tree = synth.write_tree(repo, tasks=["Cars"])  # repo/pool.yaml, the hook's default config
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "a pool")
    good = _try_repo(repo, env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"openclip-pool verify\.+Passed", good.stdout), good.stdout

    damaged = tree.files["cars"]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a truncated download
    _git(repo, env, "commit", "-qam", "a truncated checkpoint")
    bad = _try_repo(repo, env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"openclip-pool verify\.+Failed", bad.stdout), bad.stdout
    assert "models.cars" in bad.stdout and "1 of 5 entries failed" in bad.stdout

    tree.config.rename(repo / "other.yaml")  # no pool.yaml: a clear failure, never a silent pass
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-qm", "config renamed")
    missing = _try_repo(repo, env)
    assert missing.returncode == 1 and "pool config not found" in missing.stdout, missing.stdout


# -- the GitHub Action -------------------------------------------------------------------------------
def _action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def _step(name: str) -> dict:
    (step,) = [s for s in _action()["runs"]["steps"] if s.get("name") == name]
    return step


def test_action_is_a_composite_with_its_inputs_and_uploads_the_junit_xml():
    action = _action()
    assert action["runs"]["using"] == "composite"
    assert {"config", "python-version"} <= set(action["inputs"])
    uses = [s.get("uses", "") for s in action["runs"]["steps"]]
    assert any(u.startswith("actions/setup-python@") for u in uses)
    assert any(u.startswith("actions/cache@") for u in uses)
    (upload,) = [s for s in action["runs"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()" and upload["with"]["path"].endswith("junit.xml")
    verify = _step("Verify the pool")
    assert "--junitxml=\"$REPORT_DIR/junit.xml\"" in verify["run"]
    # every input reaches the scripts through env:, never pasted into the script's text
    for step in action["runs"]["steps"]:
        assert "${{" not in step.get("run", ""), step["run"]


def test_the_options_the_action_uses_exist(tmp_path):
    script = _step("Verify the pool")["run"] + _step("Install openclip-pool")["run"]
    options = set(re.findall(r"--openclip-pool-[a-z-]+", script))
    assert {"--openclip-pool-verify", "--openclip-pool-no-instantiate"} <= options
    helped = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--help"], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for option in options | {"--junit-xml"}:  # pytest's help spells --junitxml so
        assert option in helped.stdout, option
    assert "openclip-pool --version" in script
    assert build_parser().parse_args(["verify", "pool.yaml"]).command == "verify"


def _run_verify_step(workspace: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = _env(tmp_path)
    env.update(CONFIG="pool.yaml", DATA_ONLY="true", PYTEST_ARGS="", REPORT_DIR=str(tmp_path / "report"))
    return subprocess.run(["bash", "-eo", "pipefail", "-c", _step("Verify the pool")["run"]], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("bash") is None, reason="the action's steps run in bash")
def test_the_action_verify_step_writes_junit_and_gates(tmp_path):
    workspace = tmp_path / "workspace"
    tree = synth.write_tree(workspace, tasks=["Cars"])
    (workspace / "tests").mkdir()
    (workspace / "tests" / "test_theirs.py").write_text("def test_not_collected():\n    raise AssertionError\n")
    run = _run_verify_step(workspace, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    cases = list(ET.parse(tmp_path / "report" / "junit.xml").getroot().iter("testcase"))
    assert sorted(c.get("name") for c in cases) == sorted(
        ["models._pretrained_", "models.cars", "models.cars_state_dict", "models.cars_safetensors",
         "classification_heads.cars"])
    damaged = tree.files["head_cars"]
    damaged.write_bytes(damaged.read_bytes()[:100])
    run = _run_verify_step(workspace, tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    failed = [c.get("name") for c in ET.parse(tmp_path / "report" / "junit.xml").getroot().iter("testcase")
              if c.find("failure") is not None]
    assert failed == ["classification_heads.cars"], failed

"""The downstream pytest plugin: off by default, the fixtures when a project turns it on.

What needs a fresh interpreter (what the installed entry point imports, and what it does on its
own) runs as two subprocess pytest runs, each shared by several tests through a module-scoped
fixture: one with the plugin left off, one with it on. The switches themselves (command line
flag, ``pytest_plugins`` beside the option) run in-process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOWNSTREAM_TEST = '''
import sys

import torch
from pool import ClassificationHead, ImageEncoder, OpenCLIPVisionModelPool


def test_every_form_reproduces_the_expected_outputs(pool_golden):
    pool = OpenCLIPVisionModelPool.from_config(pool_golden.config)
    assert {"dtd_hydra", "eurosat_pickle_path", "cars_state_dict", "cars_safetensors"} <= set(pool_golden.models)
    for name in pool.all_model_names:
        pool_golden.assert_encoder(name, pool.load_model(name))
    for name in pool.classification_head_names:
        pool_golden.assert_head(name, pool.load_classification_head(name))


def test_factories(write_encoder, write_head, tiny_arch, synth_tree):
    path, original = write_encoder("legacy")
    assert ImageEncoder.load(path).state_dict().keys() == original.state_dict().keys()
    head_path, _ = write_head("pickle")
    assert isinstance(ClassificationHead.load(head_path), ClassificationHead)
    assert synth_tree.config.is_file() and tiny_arch.image_size == 32


def test_registered_by_the_entry_point(request):
    pm = request.config.pluginmanager
    assert pm.get_plugin("openclip_pool") is sys.modules["pool.pytest_plugin"]
    assert pm.get_plugin("pool.testing") is sys.modules["pool.testing"]


def test_a_failing_helper_shows_the_values(pool_golden):
    """Fails on purpose: the outer test reads the failure report."""
    pool_golden.assert_encoder("cars", torch.nn.Linear(2, 2))
'''

ABSENT_TEST = '''
import sys

import pytest


def test_fixtures_absent(request):
    for name in ("pool_golden", "synth_tree", "write_encoder", "write_head", "tiny_arch"):
        with pytest.raises(pytest.FixtureLookupError):
            request.getfixturevalue(name)


def test_entry_point_loaded_but_nothing_registered_or_imported(request):
    pm = request.config.pluginmanager
    assert pm.get_plugin("openclip_pool") is sys.modules["pool.pytest_plugin"]
    assert not pm.has_plugin("pool.testing")
    assert "pool.testing" not in sys.modules  # the fixtures' module
    assert "torch" not in sys.modules  # the entry point loads in every pytest run: it stays cheap
'''


@dataclass
class Run:
    returncode: int
    output: str

    def outcome(self, test: str) -> str:
        """PASSED, FAILED, ERROR, ... of one downstream test (from the ``-v`` lines)."""
        found = re.search(rf"::{re.escape(test)} (PASSED|FAILED|ERROR|SKIPPED)", self.output)
        assert found, f"{test} did not run:\n{self.output[-3000:]}"
        return found.group(1)


def run_pytest_subprocess(root: Path, test_source: str, ini: str) -> Run:
    """pytest in a fresh interpreter on a one-file project: the installed entry point is loaded the
    way every downstream run loads it, nothing is imported beforehand."""
    (root / "pytest.ini").write_text(ini)
    (root / "test_downstream.py").write_text(test_source)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                           f"--basetemp={root / 'tmp'}", "test_downstream.py"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    return Run(proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def run_off(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run_pytest_subprocess(tmp_path_factory.mktemp("plugin_off"), ABSENT_TEST, "[pytest]\n")


@pytest.fixture(scope="module")
def run_on(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run_pytest_subprocess(tmp_path_factory.mktemp("plugin_on"), DOWNSTREAM_TEST,
                                 "[pytest]\nopenclip_pool_fixtures = true\n")


def test_entry_point_is_registered():
    eps = [ep for dist in distributions() for ep in dist.entry_points
           if ep.group == "pytest11" and ep.value == "pool.pytest_plugin"]
    assert eps, "reinstall the package (pip install -e .) to register the pytest11 entry point"
    assert eps[0].name == "openclip_pool"


def test_off_by_default(run_off: Run):
    assert run_off.outcome("test_fixtures_absent") == "PASSED", run_off.output


def test_entry_point_module_defines_no_fixtures_and_imports_no_torch(run_off: Run):
    """The entry point loads in every pytest run of any project with pool installed: off, it
    registers nothing and imports neither the fixtures nor torch (pool/__init__.py imports its
    names lazily)."""
    assert run_off.outcome("test_entry_point_loaded_but_nothing_registered_or_imported") == "PASSED", \
        run_off.output
    assert run_off.returncode == 0, run_off.output


def test_ini_option_turns_it_on(run_on: Run):
    assert run_on.outcome("test_every_form_reproduces_the_expected_outputs") == "PASSED", run_on.output
    assert run_on.outcome("test_factories") == "PASSED", run_on.output


def test_installed_entry_point_autoloads_in_a_subprocess(run_on: Run):
    assert run_on.outcome("test_registered_by_the_entry_point") == "PASSED", run_on.output


def test_a_failing_assert_helper_reports_the_compared_values(run_on: Run):
    """pool.testing's asserts are rewritten (pool.pytest_plugin registers the module before it
    imports it): a failing GoldenTree.assert_encoder shows both key lists, not only its message."""
    assert run_on.outcome("test_a_failing_helper_shows_the_values") == "FAILED", run_on.output
    assert run_on.returncode == 1, run_on.output  # that one failure and nothing else
    assert "AssertionError: cars: state_dict keys differ" in run_on.output, run_on.output
    assert re.search(r"assert \['weight', 'bias'\] == \['model\.", run_on.output), run_on.output
    assert "At index 0 diff: 'weight' != 'model." in run_on.output, run_on.output


def test_command_line_flag_turns_it_on(pytester: pytest.Pytester):
    pytester.makepyfile(test_downstream="def test_it(tiny_arch):\n    assert tiny_arch.layers == 2\n")
    off = pytester.runpytest_inprocess()
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'tiny_arch' not found*"])
    pytester.runpytest_inprocess("--openclip-pool-fixtures").assert_outcomes(passed=1)


def test_pytest_plugins_line_still_works_with_the_option_on(pytester: pytest.Pytester):
    """pool.testing loaded by a conftest and the option on: registered once, no duplicate error."""
    pytester.makeini("[pytest]\nopenclip_pool_fixtures = true\n")
    pytester.makeconftest('pytest_plugins = ["pool.testing"]\n')
    pytester.makepyfile(test_downstream="def test_it(tiny_arch):\n    assert tiny_arch.layers == 2\n")
    pytester.runpytest_inprocess().assert_outcomes(passed=1)

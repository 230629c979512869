"""The downstream pytest plugin: off by default, the fixtures when a project turns it on."""

from __future__ import annotations

from importlib.metadata import distributions

import pytest

pytest_plugins = ["pytester"]

DOWNSTREAM_TEST = '''
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
'''

ABSENT_TEST = '''
import pytest


def test_fixtures_absent(request):
    for name in ("pool_golden", "synth_tree", "write_encoder", "write_head", "tiny_arch"):
        with pytest.raises(pytest.FixtureLookupError):
            request.getfixturevalue(name)
'''


def test_entry_point_is_registered():
    eps = [ep for dist in distributions() for ep in dist.entry_points
           if ep.group == "pytest11" and ep.value == "pool.pytest_plugin"]
    assert eps, "reinstall the package (pip install -e .) to register the pytest11 entry point"
    assert eps[0].name == "openclip_pool"


def test_off_by_default(pytester: pytest.Pytester):
    pytester.makepyfile(test_downstream=ABSENT_TEST)
    result = pytester.runpytest_subprocess()  # the installed entry point loads pool.pytest_plugin
    result.assert_outcomes(passed=1)
    assert "pool.testing" not in result.stdout.str()


def _imported_by_entry_point(module: str) -> bool:
    import subprocess
    import sys

    code = f"import sys, pool.pytest_plugin; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_entry_point_module_defines_no_fixtures():
    assert not _imported_by_entry_point("pool.testing")


def test_entry_point_module_imports_no_torch():
    """The entry point loads in every pytest run of any project with pool installed: it must stay
    cheap (pool/__init__.py imports its names lazily)."""
    assert not _imported_by_entry_point("torch")


def test_ini_option_turns_it_on(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nopenclip_pool_fixtures = true\n")
    pytester.makepyfile(test_downstream=DOWNSTREAM_TEST)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)


def test_command_line_flag_turns_it_on(pytester: pytest.Pytester):
    pytester.makepyfile(test_downstream="def test_it(tiny_arch):\n    assert tiny_arch.layers == 2\n")
    pytester.runpytest_subprocess().assert_outcomes(errors=1)
    pytester.runpytest_subprocess("--openclip-pool-fixtures").assert_outcomes(passed=1)


def test_pytest_plugins_line_still_works_with_the_option_on(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nopenclip_pool_fixtures = true\n")
    pytester.makeconftest('pytest_plugins = ["pool.testing"]\n')
    pytester.makepyfile(test_downstream="def test_it(tiny_arch):\n    assert tiny_arch.layers == 2\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_installed_entry_point_autoloads_in_a_subprocess(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nopenclip_pool_fixtures = true\n")
    pytester.makepyfile(test_downstream="def test_it(tiny_arch):\n    assert tiny_arch.layers == 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)

"""The ``openclip_pool`` pytest plugin (a ``pytest11`` entry point): off unless a project enables it.

Installing ``openclip-pool`` makes pytest load this module in every project, so it does nothing
but register two switches; only when one of them is on does it register `pool.testing` (which
imports torch and defines the fixtures ``tiny_arch``, ``synth_tree``, ``write_encoder``,
``write_head`` and ``pool_golden``)::

    # pyproject.toml of the downstream project
    [tool.pytest.ini_options]
    openclip_pool_fixtures = true

or ``pytest --openclip-pool-fixtures``. (``-p pool.testing`` or ``pytest_plugins = ["pool.testing"]``
in a root conftest.py load the fixtures directly, without this module.)

The second switch, ``pytest --openclip-pool-verify CONFIG`` (or the ``openclip_pool_verify`` ini
value), registers `pool.pytest_verify`: one test item per entry of that pool config, checked as
``python -m pool verify`` checks it (JUnit XML, ``-k``, ``-n N`` with pytest-xdist). With
``--openclip-pool-no-instantiate`` (or ``openclip_pool_no_instantiate = true``) the config is read
in the data-only mode, as ``verify --no-instantiate`` reads it; ``--openclip-pool-allow-global
MODULE.NAME`` (or the ``openclip_pool_allow_globals`` ini lines) accepts a global besides pool's
allowlist, as ``verify --allow-global`` does. Each item runs the integrity pass first (zip CRC32s,
safetensors headers), as ``verify`` does by default; ``--openclip-pool-no-integrity`` (or
``openclip_pool_no_integrity = true``) skips it, as ``verify --no-integrity``. With
``--openclip-pool-locked`` (or ``openclip_pool_locked = true``) every item is checked against the
config's ``pool.lock`` (``python -m pool lock CONFIG``), as ``verify --locked`` checks it.
"""

from __future__ import annotations

import importlib
import sys

import pytest

_INI = "openclip_pool_fixtures"
_OPTION = "--openclip-pool-fixtures"
_PLUGIN = "pool.testing"
_VERIFY_INI = "openclip_pool_verify"
_VERIFY_OPTION = "--openclip-pool-verify"
_VERIFY_PLUGIN = "pool.pytest_verify"
_NO_INSTANTIATE_INI = "openclip_pool_no_instantiate"
_NO_INSTANTIATE_OPTION = "--openclip-pool-no-instantiate"
_ALLOW_GLOBALS_INI = "openclip_pool_allow_globals"
_ALLOW_GLOBAL_OPTION = "--openclip-pool-allow-global"
_NO_INTEGRITY_INI = "openclip_pool_no_integrity"
_NO_INTEGRITY_OPTION = "--openclip-pool-no-integrity"
_LOCKED_INI = "openclip_pool_locked"
_LOCKED_OPTION = "--openclip-pool-locked"

# pool.testing's assert helpers (GoldenTree.assert_encoder, ...) report the values they compared
# only if pytest rewrites the module's asserts, which must be arranged before it is imported:
# pytest does it for a module loaded with -p or pytest_plugins, but not for the import in
# pytest_configure below. (Entry points load before any conftest or test module.)
if _PLUGIN not in sys.modules:
    pytest.register_assert_rewrite(_PLUGIN)


def pytest_addoption(parser) -> None:
    parser.addini(_INI, type="bool", default=False,
                  help="register pool's checkpoint fixtures (tiny_arch, synth_tree, write_encoder, "
                       "write_head, pool_golden)")
    group = parser.getgroup("openclip-pool")
    group.addoption(_OPTION, action="store_true", default=False, dest="openclip_pool_fixtures",
                    help=f"register pool's checkpoint fixtures (same as the {_INI} ini option)")
    parser.addini(_VERIFY_INI, default="", help="a pool config: one test item per entry, checked as verify does")
    group.addoption(_VERIFY_OPTION, metavar="CONFIG", default=None, dest=_VERIFY_INI,
                    help=f"one test item per entry of this pool config, checked as `python -m pool verify` "
                         f"does (same as the {_VERIFY_INI} ini option)")
    parser.addini(_NO_INSTANTIATE_INI, type="bool", default=False,
                  help="read the --openclip-pool-verify config in the data-only mode (no _target_, no resolvers)")
    group.addoption(_NO_INSTANTIATE_OPTION, action="store_true", default=False, dest=_NO_INSTANTIATE_INI,
                    help="data-only mode for a config from outside: refuse Hydra _target_ entries and resolvers "
                         "such as ${oc.env:...} instead of running them, as `python -m pool verify "
                         f"--no-instantiate` does (same as the {_NO_INSTANTIATE_INI} ini option)")
    parser.addini(_ALLOW_GLOBALS_INI, type="linelist", default=[],
                  help="globals (MODULE.NAME, one a line) the --openclip-pool-verify entries accept besides "
                       "pool's allowlist")
    group.addoption(_ALLOW_GLOBAL_OPTION, metavar="MODULE.NAME", action="append", default=[],
                    dest=_ALLOW_GLOBALS_INI,
                    help="accept this exact global besides pool's allowlist, as `python -m pool verify "
                         f"--allow-global` does (repeatable; adds to the {_ALLOW_GLOBALS_INI} ini option)")
    parser.addini(_NO_INTEGRITY_INI, type="bool", default=False,
                  help="skip the integrity pass (zip CRC32s, safetensors headers) of the --openclip-pool-verify items")
    group.addoption(_NO_INTEGRITY_OPTION, action="store_true", default=False, dest=_NO_INTEGRITY_INI,
                    help="skip the integrity pass (zip CRC32s, safetensors headers) each item runs before loading "
                         f"by default, as `python -m pool verify --no-integrity` (same as the {_NO_INTEGRITY_INI} "
                         "ini option)")
    parser.addini(_LOCKED_INI, type="bool", default=False,
                  help="check every --openclip-pool-verify item against the config's pool.lock")
    group.addoption(_LOCKED_OPTION, action="store_true", default=False, dest=_LOCKED_INI,
                    help="fail every item whose file or tensors drifted from pool.lock beside the config (written "
                         "by `python -m pool lock CONFIG`), as `python -m pool verify --locked` (same as the "
                         f"{_LOCKED_INI} ini option)")


def _enabled(config) -> bool:
    return bool(config.getoption("openclip_pool_fixtures", default=False) or config.getini(_INI))


def pytest_configure(config) -> None:
    if (config.getoption(_VERIFY_INI, default=None) or config.getini(_VERIFY_INI)) and \
            not config.pluginmanager.has_plugin(_VERIFY_PLUGIN):
        module = importlib.import_module(_VERIFY_PLUGIN)
        config.pluginmanager.register(module, _VERIFY_PLUGIN)
        module.pytest_configure(config)  # registered after the configure hooks ran: its markers now
    if not _enabled(config):
        return
    pm = config.pluginmanager
    if pm.has_plugin(_PLUGIN):  # already loaded by -p or pytest_plugins
        return
    pm.register(importlib.import_module(_PLUGIN), _PLUGIN)

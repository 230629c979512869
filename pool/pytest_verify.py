"""``pytest --openclip-pool-verify CONFIG``: one test item per pool entry, checked as ``verify`` does.

Registered by `pool.pytest_plugin` only when the option (or the ``openclip_pool_verify`` ini
value) names a config, so projects that do not ask pay nothing. Each model and head becomes an
item ``<config>::models.<name>`` / ``<config>::classification_heads.<name>`` (the config's path
relative to pytest's rootdir, so JUnit XML's ``classname`` is the config) with markers
``pool_models`` / ``pool_heads``, ``pool_form_<form>`` and ``pool_container_<container>``, so a CI
gets JUnit XML (``--junitxml``), ``-k`` / ``-m`` selection and pytest-xdist parallelism (``-n N``)
for free. A failing item shows that entry's report (the traceback with ``--tb=long``). Each item
runs verify's integrity pass first (``--openclip-pool-no-integrity`` skips it) and, with
``--openclip-pool-locked``, is checked against the config's ``pool.lock``; an entry only the lock
has is an item that fails. Relative config paths resolve against the
directory pytest was started in; the entries inside resolve as ``verify`` resolves them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from .allowlist import parse_allow_globals
from .checkpoint import sniff_container
from .errors import EntryFailed, PoolError
from .lock import PoolLock, default_lock_path
from .verify import EntryChecker, prepare_pool

__all__ = ["PoolEntryItem", "EntryFailed"]

_OPTION_DEST = "openclip_pool_verify"
_NO_INSTANTIATE_DEST = "openclip_pool_no_instantiate"
_ALLOW_GLOBALS_DEST = "openclip_pool_allow_globals"
_NO_INTEGRITY_DEST = "openclip_pool_no_integrity"
_LOCKED_DEST = "openclip_pool_locked"
FORMS = ("path", "pickle_path", "state_dict_path", "hydra", "module")
CONTAINERS = ("zip", "legacy", "pickle", "safetensors", "hf")
_MARKERS = ("pool_models: a pool model entry (pytest --openclip-pool-verify)",
           "pool_heads: a pool classification-head entry (pytest --openclip-pool-verify)",
           *(f"pool_form_{form}: a pool entry of the {form} form" for form in FORMS),
           *(f"pool_container_{c}: a pool entry whose file is a {c} container" for c in CONTAINERS))


def _config_path(config: pytest.Config) -> Path | None:
    """The pool config to verify: the command-line value relative to the folder pytest started in,
    the ini value relative to the ini file's folder (so ``pytest`` works from any subfolder)."""
    option = config.getoption(_OPTION_DEST, default=None)
    value = option or config.getini(_OPTION_DEST)
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    base = config.invocation_params.dir if option else (config.inipath.parent if config.inipath else config.rootpath)
    return Path(base) / path


def _instantiate_allowed(config: pytest.Config) -> bool:
    """False when ``--openclip-pool-no-instantiate`` (or its ini value) asks for the data-only mode."""
    return not (config.getoption(_NO_INSTANTIATE_DEST, default=False) or config.getini(_NO_INSTANTIATE_DEST))


def _allowed_globals(config: pytest.Config) -> tuple[str, ...]:
    """The globals ``--openclip-pool-allow-global`` and the ini lines accept besides the allowlist."""
    return tuple(sorted({*(config.getoption(_ALLOW_GLOBALS_DEST, default=None) or []),
                         *config.getini(_ALLOW_GLOBALS_DEST)}))


def _flag(config: pytest.Config, dest: str) -> bool:
    """A boolean option, from the command line or the ini file."""
    return bool(config.getoption(dest, default=False) or config.getini(dest))


@functools.cache
def _checker(path: str, instantiate: bool = True, allow: tuple[str, ...] = (), integrity: bool = True,
             locked: bool = False) -> EntryChecker:
    """One checker per process (per xdist worker): ``_pretrained_`` is loaded once for task vectors."""
    pool, models, heads = prepare_pool(path, instantiate=instantiate)
    pool.allow_globals |= parse_allow_globals(allow)
    lock = PoolLock.read(default_lock_path(path), path) if locked else None
    return EntryChecker(pool, models, heads, integrity=integrity, lock=lock)


def _node_path(config: pytest.Config, path: Path) -> str:
    """The config as node ids name it: relative to pytest's rootdir when under it."""
    try:
        return path.absolute().relative_to(config.rootpath).as_posix()
    except ValueError:
        return path.absolute().as_posix()


def _marker(prefix: str, value: str | None) -> Any:
    return getattr(pytest.mark, f"{prefix}{re.sub(r'[^0-9a-zA-Z_]', '_', value or 'none')}")


class PoolEntryItem(pytest.Item):
    """One pool entry as a test item.

    Args:
        config_file: the pool config's absolute path.
        label: the entry (``models.<name>`` or ``classification_heads.<name>``).
        instantiate: False when the config is read in the data-only mode.
        allow: globals accepted besides pool's allowlist (``--openclip-pool-allow-global``).
        integrity: run the integrity pass first (False with ``--openclip-pool-no-integrity``).
        locked: check the entry against the config's ``pool.lock`` (``--openclip-pool-locked``).
        **kwargs: `pytest.Item`'s (``parent``, ``name``, ``nodeid``), as ``from_parent`` passes them.
    """

    def __init__(self, *, config_file: str, label: str, instantiate: bool = True, allow: tuple[str, ...] = (),
                 integrity: bool = True, locked: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_file, self.label, self.instantiate, self.allow = config_file, label, instantiate, allow
        self.integrity, self.locked = integrity, locked

    def runtest(self) -> None:
        """Check the entry; its report goes into ``user_properties`` (JUnit XML carries them).

        Raises:
            EntryFailed: the entry did not pass.
        """
        result = _checker(self.config_file, self.instantiate, self.allow, self.integrity, self.locked).check(self.label)
        data = result.as_dict()
        if not self._long_tracebacks:  # JUnit XML carries the entry's report, not the traceback
            data.pop("traceback", None)
        self.user_properties.append(("pool_entry", data))
        if not result.ok:
            raise EntryFailed(result)

    @property
    def _long_tracebacks(self) -> bool:
        return self.config.getoption("tbstyle", "auto") == "long"

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        """The entry's report for a failed entry (its traceback only with ``--tb=long``); pytest's
        usual report for anything else.

        Args:
            excinfo: what the item raised.
            style: pytest's traceback style (used for other exceptions).

        Returns:
            The text pytest shows for the failure.
        """
        if isinstance(excinfo.value, EntryFailed):
            r = excinfo.value.result
            lines = [f"{r.label} failed at {r.stage}: {r.error}", f"  form       {r.form}",
                     f"  file       {r.file or '-'}", f"  container  {r.container or '-'}",
                     f"  error type {r.error_type}"]
            if r.traceback and self._long_tracebacks:
                lines += ["", r.traceback.rstrip()]
            return "\n".join(lines)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        """Where pytest says the item is.

        Returns:
            ``(config file, None, "pool entry <label>")``.
        """
        return Path(self.config_file), None, f"pool entry {self.label}"


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add one item per entry (before ``-k`` / ``-m`` deselection, which runs after this hook)."""
    path = _config_path(config)
    if path is None:
        return
    if not path.is_file():
        raise pytest.UsageError(f"--openclip-pool-verify {path}: no such pool config file")
    # the entries are read without loading any weights: prepare_pool only resolves them
    instantiate, allow = _instantiate_allowed(config), _allowed_globals(config)
    integrity, locked = not _flag(config, _NO_INTEGRITY_DEST), _flag(config, _LOCKED_DEST)
    try:
        checker = _checker(str(path), instantiate, allow, integrity, locked)
    except PoolError as exc:  # a config the user fixes: pytest's usage error, not an internal error
        raise pytest.UsageError(f"--openclip-pool-verify {path}: {exc}") from None
    node = _node_path(config, path)
    for label in checker.labels:
        item = PoolEntryItem.from_parent(session, name=label, nodeid=f"{node}::{label}", config_file=str(path),
                                         label=label, instantiate=instantiate, allow=allow, integrity=integrity,
                                         locked=locked)
        item.add_marker(pytest.mark.pool_models if label.startswith("models.") else pytest.mark.pool_heads)
        try:
            entry = checker.entry(label)
        except KeyError:  # an entry only the lock file has: the item fails, naming it
            items.append(item)
            continue
        item.add_marker(_marker("pool_form_", entry.form))
        if entry.path is not None:
            try:
                item.add_marker(_marker("pool_container_", sniff_container(entry.path)))
            except (PoolError, OSError):  # the item itself reports the file's problem
                pass
        items.append(item)

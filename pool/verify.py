"""Verify a pool: load every model and head once, check them, and say which fail and why.

`verify_pool` is what ``python -m pool verify`` runs. For each model (``_pretrained_`` first) it
records the form, container, file, architecture (read from the weights; the configured
``model_name`` is checked against it), parameter count, a forward pass on a small random batch
and the time of each step: the load, reading every weight (memory-mapped pages are touched, so a
cold file's reading is timed here), the forward and the task vector. The head of the same name is
loaded next and fed that encoder's features; each fine-tuned model's task vector against
``_pretrained_`` is checked (same keys and shapes) and its L2 norm reported. Unpaired heads are
checked alone. One encoder is in memory at a time (plus the pretrained state dict, kept for the
task vectors). A failing entry never stops the others.

This module reads the pool, orders and shards its entries and runs them; the checks of one entry
are `pool.verify_checks`', the report's types `pool.verify_report`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arch import arch_for_name
from .cache import resolve_cache_dir
from .entries import Entry
from .errors import ConfigError, TaskVectorError
from .lock import PoolLock
from .modelpool import OpenCLIPVisionModelPool
from .sharding import shard_units
from .task_vectors import PRETRAINED
from .verify_checks import VerifyRun, arch_label, read_weights, task_vector
from .verify_report import EntryResult, VerifyReport, versions

__all__ = ["EntryResult", "VerifyReport", "verify_pool", "prepare_pool", "versions", "arch_label", "cache_label",
           "TaskVectorError", "shard_entries", "verify_order", "lock_orphans", "orphan_results", "EntryChecker", "read_weights", "task_vector"]


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def prepare_pool(config: str | Path, *, instantiate: bool = True
                 ) -> tuple[OpenCLIPVisionModelPool, list[Entry], list[Entry]]:
    """Read a pool config and resolve every entry, raising one ConfigError listing all problems.

    The problems are the ones the user fixes in the YAML: unknown keys, unknown model_name, no
    entries. Nothing is loaded yet.

    Args:
        config: the pool YAML file (anything `OpenCLIPVisionModelPool.from_config` reads).
        instantiate: False for the data-only mode (``verify --no-instantiate``): a config with
            Hydra keys or resolver calls is refused before anything is resolved.

    Returns:
        ``(pool, models, heads)``: the pool and its model and head entries, ``_pretrained_``
        first among the models; what `verify_pool` takes.

    Raises:
        ConfigError: the config cannot be read, has unknown or malformed entries or unknown
            model names (all listed in one message), or has no models and no heads; in the
            data-only mode, it has a Hydra key or a resolver call.

    Example:
        >>> from pool.verify import prepare_pool
        >>> pool, models, heads = prepare_pool("pool.yaml")  # doctest: +SKIP
        >>> [entry.label for entry in models]  # doctest: +SKIP
        ['models._pretrained_', 'models.cars']
    """
    modelpool_log = logging.getLogger("pool.modelpool")
    quiet = _DropMessage("the pool has no models")  # verify reports emptiness itself, as an error
    modelpool_log.addFilter(quiet)
    try:
        pool = OpenCLIPVisionModelPool.from_config(config, instantiate=instantiate)
    finally:
        modelpool_log.removeFilter(quiet)
    problems: list[str] = []
    models: list[Entry] = []
    heads: list[Entry] = []
    for section, names, out in (("models", pool.all_model_names, models),
                                ("classification_heads", pool.classification_head_names, heads)):
        for name in names:
            try:
                entry = pool.entry(name, section)
                if entry.model_name:
                    arch_for_name(entry.model_name)
                out.append(entry)
            except ConfigError as exc:
                problems.append(str(exc) if str(exc).startswith(section) else f"{section}.{name}: {exc}")
    if problems:
        raise ConfigError(pool.redact(f"{config}: " + " ".join(problems)))
    if not models and not heads:
        raise ConfigError(f"{config}: the config has no models and no classification_heads; "
                          "nothing to verify.")
    models.sort(key=lambda e: e.name != PRETRAINED)  # _pretrained_ first: task vectors need it
    return pool, models, heads


def verify_pool(pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                config_label: str, device: str | None = None, integrity: bool = True, debug: bool = False,
                progress: Callable[[str], None] | None = None,
                on_result: Callable[[EntryResult], None] | None = None, lock: PoolLock | None = None,
                records: dict[str, dict[str, Any]] | None = None, lock_dir: Path | None = None) -> VerifyReport:
    """Check every entry of a prepared pool (`prepare_pool`) and return the report.

    Args:
        pool, models, heads: what `prepare_pool` returned (``_pretrained_`` first).
        config_label: how the report names the config.
        device: where to load and run (default CPU).
        integrity: check each file's checksums / header before loading it (the default).
        debug: keep each failure's traceback in the report.
        progress: called with an entry's label when its check starts.
        on_result: called with each `EntryResult` as soon as it is complete (to stream it).
        lock: fail every entry that drifted from this lock file (``verify --locked``); entries of
            the lock that the config lacks are the caller's to report (`pool.lock.PoolLock.orphans`).
        records: when a dict, each passing entry's lock record goes there by label (``lock``).
        lock_dir: the folder the records' paths are relative to (default: ``lock``'s folder).

    Returns:
        The `VerifyReport`; it never raises for an entry's failure, which is recorded instead.

    Example:
        >>> import tempfile
        >>> from pool.synth import write_tree
        >>> from pool.verify import prepare_pool, verify_pool
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     pool, models, heads = prepare_pool(write_tree(tmp, tasks=["Cars"]).config)
        ...     report = verify_pool(pool, models, heads, config_label="a tiny tree")
        >>> for entry in report.entries:
        ...     print(entry.label, entry.ok)
        models._pretrained_ True
        models.cars True
        classification_heads.cars True
        models.cars_state_dict True
        models.cars_safetensors True
    """
    start = time.perf_counter()
    run = VerifyRun(pool, device=device, integrity=integrity, debug=debug, on_result=on_result, lock=lock,
                    records=records, lock_dir=lock_dir)
    tick = progress or (lambda _label: None)
    head_by_name = {e.name: e for e in heads}
    results: list[EntryResult] = []

    def done(result: EntryResult) -> None:
        results.append(result)
        run.on_result(result)

    for entry in models:
        tick(entry.label)
        res, encoder, features = run.model(entry)
        head_entry = head_by_name.pop(entry.name, None)
        if head_entry is not None:
            res.paired_head = head_entry.label
        done(res)
        if head_entry is not None:
            tick(head_entry.label)
            done(run.head(head_entry, encoder, features, paired_ok=res.ok))
        del encoder, features
    for entry in head_by_name.values():
        tick(entry.label)
        done(run.head(entry, None, None, paired_ok=None))
    return VerifyReport(config_label, str(run.dev), integrity, results, time.perf_counter() - start,
                        versions=versions(), allowed_globals=sorted(pool.allow_globals),
                        cache_dir=cache_label(pool), lock_file=str(lock.path) if lock is not None else None)


def cache_label(pool: OpenCLIPVisionModelPool) -> str | None:
    """The conversion cache the pool's loads use (its ``cache_dir``, else ``$OPENCLIP_POOL_CACHE_DIR``).

    Args:
        pool: the pool.

    Returns:
        The cache folder, or None when the cache is off (or its setting is no path).
    """
    try:
        where = resolve_cache_dir(pool.cache_dir)
    except ConfigError:
        return None
    return str(where) if where is not None else None


def lock_orphans(lock: PoolLock | None, labels: list[str]) -> list[tuple[str, Exception]]:
    """The lock file's entries that the config lacks, each with its failure (none without a lock).

    Args:
        lock: the lock file, or None.
        labels: every entry label of the config.

    Returns:
        ``(label, error)`` pairs, sorted by label.
    """
    return lock.orphans(labels) if lock is not None else []


def orphan_results(lock: PoolLock | None, labels: list[str]) -> list[EntryResult]:
    """A failed `EntryResult` per entry of the lock file that the config lacks (``verify --locked``).

    Args:
        lock: the lock file, or None.
        labels: every entry label of the config.

    Returns:
        The failed results (stage ``lock``), sorted by label.
    """
    out = []
    for label, error in lock_orphans(lock, labels):
        section, _, name = label.partition(".")
        out.append(EntryResult(name, section, "-").failed(error, stage="lock"))
    return out


def verify_order(models: list[Entry], heads: list[Entry]) -> list[str]:
    """Entry labels in the order `verify_pool` checks them: each model followed by its head of the
    same name, then the heads with no model.

    Args:
        models, heads: the entries, as `prepare_pool` returns them.

    Returns:
        The labels (``models.<name>``, ``classification_heads.<name>``).
    """
    head_names = {h.name for h in heads}
    model_names = {m.name for m in models}
    out = []
    for model in models:
        out.append(model.label)
        if model.name in head_names:
            out.append(f"classification_heads.{model.name}")
    return out + [h.label for h in heads if h.name not in model_names]


def shard_entries(models: list[Entry], heads: list[Entry], rank: int, world_size: int
                  ) -> tuple[list[Entry], list[Entry]]:
    """The entries rank ``rank`` of ``world_size`` checks: deterministic, balanced by file size
    (`pool.sharding.shard_units`), a model and its head of the same name together.

    Args:
        models, heads: every entry, as `prepare_pool` returns them.
        rank, world_size: this process and the number of processes.

    Returns:
        ``(models, heads)`` of this rank, in the order verify checks them.
    """
    head_by_name = {e.name: e for e in heads}
    units: list[tuple[Entry | None, Entry | None]] = [(m, head_by_name.pop(m.name, None)) for m in models]
    units += [(None, h) for h in head_by_name.values()]

    sizes = [sum(e.file_size for e in unit if e is not None) for unit in units]
    mine = shard_units(units, sizes, rank, world_size)
    return [m for m, _ in mine if m is not None], [h for _, h in mine if h is not None]


class EntryChecker:
    """Checks one pool entry at a time, as verify would (what the pytest items run): a model's
    load, weights, forward and task vector; a head with the encoder of the same name.

    Args:
        pool, models, heads: what `prepare_pool` returned.
        device: where to load and run (default CPU).
        integrity: check each file's checksums / header first (the default).
        lock: fail every entry that drifted from this lock file (``--openclip-pool-locked``).

    Example:
        >>> checker = EntryChecker(*prepare_pool("pool.yaml"))  # doctest: +SKIP
        >>> checker.check("models.cars").ok  # doctest: +SKIP
        True
    """

    def __init__(self, pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry], *,
                 device: str | None = None, integrity: bool = True, lock: PoolLock | None = None) -> None:
        self.run = VerifyRun(pool, device=device, integrity=integrity, debug=True, on_result=None, lock=lock)
        self.lock = lock
        self.models = {e.name: e for e in models}
        self.heads = {e.name: e for e in heads}

    @property
    def labels(self) -> list[str]:
        """Every entry's label, in verify's order (each model followed by its head), then the
        labels only the lock file has (each fails: `lock_orphans`)."""
        order = verify_order(list(self.models.values()), list(self.heads.values()))
        return order + [label for label, _ in lock_orphans(self.lock, order)]

    def entry(self, label: str) -> Entry:
        """The resolved entry of a label.

        Args:
            label: ``models.<name>`` or ``classification_heads.<name>``.

        Returns:
            Its `pool.entries.Entry`.

        Raises:
            KeyError: no entry has that label.
        """
        section, _, name = label.partition(".")
        return (self.models if section == "models" else self.heads)[name]

    def check(self, label: str) -> EntryResult:
        """Check one entry; a head is checked with the encoder of the same name, if any.

        Args:
            label: ``models.<name>`` or ``classification_heads.<name>``.

        Returns:
            The entry's `EntryResult` (a failure is recorded in it, never raised).
        """
        section, _, name = label.partition(".")
        if name not in (self.models if section == "models" else self.heads):
            return next(r for r in orphan_results(self.lock, self.labels) if r.label == label)
        if section == "models":
            result, _, _ = self.run.model(self.models[name])
            if name in self.heads:
                result.paired_head = f"classification_heads.{name}"
            return result
        model = self.models.get(name)
        if model is None:
            return self.run.head(self.heads[name], None, None, paired_ok=None)
        model_result, encoder, features = self.run.model(model)
        return self.run.head(self.heads[name], encoder, features, paired_ok=model_result.ok)

"""``python -m pool verify [CONFIG]``: load and check every model and head of a pool (or of the
embedded default, a tiny tree synthesized in a temporary folder), here or under torchrun, and
print the report (text, or JSON with ``--json``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import synth
from .allowlist import parse_allow_globals
from .cli_common import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, common_root, rel, stderr_tty
from .cli_progress import Progress
from .distributed import verify_distributed, world
from .entries import Entry
from .errors import ConfigError, UsageError, printable
from .lock import PoolLock, default_lock_path
from .modelpool import OpenCLIPVisionModelPool
from .report import Style, human_count, human_time, paragraph, table
from .verify import cache_label, orphan_results, prepare_pool, verify_order, verify_pool
from .verify_report import EntryResult, HeadCheck, VerifyReport, versions

__all__ = ["run", "check_device", "config_file", "pool_from_args"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``verify`` as parsed (`pool.cli.build_parser`).

    Returns:
        The exit status: 0 every entry passed, 1 one failed, 130 interrupted (after the report of
        the entries done).

    Raises:
        UsageError: ``--device`` or ``--json`` cannot be used, or ``--locked`` without CONFIG.
        ConfigError: CONFIG is a folder or does not exist, or the lock file cannot be used.
    """
    check_device(args.device)
    _check_json_target(args.json)
    if args.config is None:
        with tempfile.TemporaryDirectory(prefix="pool-verify-") as tmp:
            if stderr_tty() and args.json != "-":
                print("synthesizing a tiny checkpoint tree ...", file=sys.stderr, end="\r", flush=True)
            tree = synth.write_tree(tmp)
            note = (f"embedded default: a tiny checkpoint tree in the task-arithmetic layout (every "
                    f"container and form, heads, {len(tree.tasks)} tasks), synthesized in {tmp} and "
                    "removed afterwards")
            return _verify(args, out, tree.config, "embedded default", note, cache=False)
    config = config_file(args.config)
    return _verify(args, out, config, str(config.absolute()), None)


def check_device(device: str | None) -> None:
    """Check ``--device``: it must name a torch device this machine has.

    Args:
        device: the option's value (None: not given).

    Raises:
        UsageError: it is no torch device, or CUDA / MPS is not available.
    """
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda, cuda:1, mps ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu.")


def _check_json_target(json_target: str | None) -> None:
    """UsageError when ``--json PATH``'s folder does not exist."""
    if json_target not in (None, "-"):
        parent = Path(json_target).expanduser().absolute().parent
        if not parent.is_dir():
            raise UsageError(f"--json {json_target}: the folder {parent} does not exist.")


def config_file(value: str) -> Path:
    """CONFIG as a path.

    Args:
        value: the argument as given.

    Returns:
        The config file's path (``~`` expanded).

    Raises:
        ConfigError: it is a folder or does not exist.
    """
    config = Path(value).expanduser()
    if config.is_dir():
        inside = [c.name for c in (config / "pool.yaml", config / "pool.safetensors.yaml") if c.is_file()]
        hint = f" It holds {', '.join(inside)}: pass that file." if inside else ""
        raise ConfigError(f"{config.absolute()} is a folder, not a pool config (YAML) file.{hint}")
    if not config.is_file():
        raise ConfigError(f"pool config not found: {config.absolute()}. Pass a pool YAML file, or no "
                          "argument to verify the embedded default.")
    return config


def pool_from_args(config: Path, args: argparse.Namespace) -> tuple[OpenCLIPVisionModelPool, list[Entry], list[Entry]]:
    """The pool CONFIG describes, read as ``--no-instantiate`` says, accepting ``--allow-global``'s
    globals (what ``verify``, ``lock`` and ``atlas`` all start from; `pool.verify.prepare_pool`).

    Raises:
        ConfigError: the config cannot be used (every problem listed).
    """
    pool, models, heads = prepare_pool(config, instantiate=not args.no_instantiate)
    pool.allow_globals |= parse_allow_globals(args.allow_global)
    return pool, models, heads


def _verify(args: argparse.Namespace, out: Style, config: Path, label: str, note: str | None, *,
            cache: bool = True) -> int:
    """Verify the pool ``config`` describes, print the report, and return the exit status (130
    after a partial report when interrupted)."""
    lock = _read_lock(args, config if cache else None)
    pool, models, heads = pool_from_args(config, args)
    if not cache:  # the embedded default: a temporary tree, nothing worth caching
        pool.cache_dir = False
    integrity = not args.no_integrity
    place = world()
    if place is not None:  # under torchrun: this rank's share, then every rank's results merged
        rank, size = place
        report, rank = verify_distributed(
            pool, models, heads, config_label=label, device=args.device, integrity=integrity, lock=lock,
            debug=args.debug, timeout_s=args.timeout, on_result=_EntryLines(0, prefix=f"[rank {rank}/{size}] "))
        report.entries += orphan_results(lock, verify_order(models, heads))
        if rank != 0:  # rank 0 alone prints and writes the report; every rank exits alike
            return EXIT_OK if report.ok else EXIT_FOUND
    else:
        report = _verify_here(args, pool, models, heads, label, lock)
    report.note = note
    _print_report(args, out, report, config)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FOUND


def _read_lock(args: argparse.Namespace, config: Path | None) -> PoolLock | None:
    """The lock file ``--locked`` / ``--lock PATH`` asks for; UsageError for the embedded default."""
    if not (args.locked or args.lock):
        return None
    if config is None:
        raise UsageError("--locked needs a CONFIG: the embedded default is synthesized afresh and has no lock file.")
    return PoolLock.read(args.lock or default_lock_path(config), args.config)


def _verify_here(args: argparse.Namespace, pool: OpenCLIPVisionModelPool, models: list[Entry], heads: list[Entry],
                 label: str, lock: PoolLock | None) -> VerifyReport:
    """Verify in this process: a progress bar on a terminal, else one line per entry on stderr.
    Ctrl-C returns the report of the entries done so far, marked interrupted."""
    total = len(models) + len(heads)
    bar = stderr_tty() and args.json != "-"
    progress = Progress(total, "verify", bar)
    stream = None if bar else _EntryLines(total)  # CI logs: one line per entry as it finishes
    done: list[EntryResult] = []

    def on_result(result: EntryResult) -> None:
        done.append(result)
        if stream is not None:
            stream(result)

    start = time.perf_counter()
    try:
        report = verify_pool(pool, models, heads, config_label=label, device=args.device,
                             integrity=not args.no_integrity, debug=args.debug, progress=progress.tick,
                             on_result=on_result, lock=lock)
    except KeyboardInterrupt:
        return VerifyReport(label, args.device or "cpu", not args.no_integrity, done, time.perf_counter() - start,
                            versions=versions(), allowed_globals=sorted(pool.allow_globals),
                            cache_dir=cache_label(pool), lock_file=str(lock.path) if lock else None,
                            interrupted=True)
    finally:
        progress.close()
    report.entries += orphan_results(lock, verify_order(models, heads))
    return report


def _print_report(args: argparse.Namespace, out: Style, report: VerifyReport, config: Path) -> None:
    """The report on stdout (text, or JSON with ``--json -``), written to ``--json PATH`` too;
    failed entries' tracebacks on stderr with ``--debug``."""
    json_target = args.json
    if args.debug:
        for entry in report.failed:
            if entry.traceback:
                print(f"--- traceback for {entry.label} ---\n{entry.traceback}", file=sys.stderr)
    if json_target == "-":
        print(report.to_json())
    else:
        print(_render_verify(report, config, out))
        if json_target:
            Path(json_target).expanduser().write_text(report.to_json() + "\n")
            print(out.dim(f"JSON report written to {json_target}"))


def _status(ok: bool, out: Style) -> str:
    """PASS or FAIL, coloured."""
    return out.ok("PASS") if ok else out.bad("FAIL")


def _time(seconds: float | None) -> str:
    """A step's time, ``-`` when it did not run."""
    return human_time(seconds) if seconds is not None else "-"


class _EntryLines:
    """One line on stderr per verified entry, as soon as it is done: what a CI log shows while a
    long verify runs (stderr is no terminal, so there is no progress bar)."""

    def __init__(self, total: int, prefix: str = "") -> None:
        self.total, self.done, self.prefix = total, 0, prefix

    def __call__(self, e: EntryResult) -> None:
        self.done += 1
        t = e.timings
        steps = [f"{name} {human_time(value)}" for name, value in
                 (("integrity", t.integrity_s), ("load", t.load_s), ("weights", t.weights_s),
                  ("lock", t.lock_s), ("forward", t.forward_s), ("task vector", t.task_vector_s))
                 if value is not None]
        detail = ", ".join(steps) if e.ok else printable(e.error or "failed")
        count = f"{self.done:>{len(str(self.total))}}/{self.total}" if self.total else str(self.done)
        print(f"{self.prefix}verify [{count}] {'PASS' if e.ok else 'FAIL'} {e.label}: {detail}",
              file=sys.stderr, flush=True)


def _header(report: VerifyReport, config: Path, root: Path | None, out: Style) -> list[str]:
    """The report's header: what ran, and whether the integrity pass, the cache and the lock were on."""
    lines = [out.bold("openclip-pool verify")]
    if report.note:
        lines.append(paragraph(report.note, prefix="  ", indent="  "))
    lines.append(f"  config     {config if report.config == 'embedded default' else report.config}")
    lines.append(f"  files      {root if root else '-'}")
    lines.append(f"  device     {report.device}")
    if report.allowed_globals:
        lines.append("  globals    " + out.warn("allowed besides pool's allowlist: " + ", ".join(report.allowed_globals))
                     + " (torch.load(weights_only=False) would call them)")
    if report.integrity_checked:
        lines.append("  integrity  on: zip CRC32 of every member, safetensors headers and offsets, checked before "
                     "loading (legacy and pickle files carry no checksums)")
    else:
        lines.append("  integrity  " + out.warn("off (--no-integrity)") + ": zip CRC32s and safetensors headers not "
                     "checked; damaged bytes in a zip would load as wrong weights")
    lines.append(f"  cache      {'on: ' + report.cache_dir if report.cache_dir else 'off'}")
    lines.append(f"  locked     {'on: every entry checked against ' + report.lock_file if report.lock_file else 'off'}")
    return lines


def _render_verify(report: VerifyReport, config: Path, out: Style) -> str:
    """The text report: a header, the models' and heads' tables, notes, failures and a summary."""
    models, heads = report.models, report.heads
    # a file shown as its config text (${oc.env:NAME}/x.pt: see OpenCLIPVisionModelPool.redact) is no root
    root = common_root([e.file for e in report.entries if e.file and os.path.isabs(e.file)])
    lines = _header(report, config, root, out)
    if models:
        lines += ["", out.bold(f"models ({len(models)})"),
                  table(["name", "form", "container", "file", "architecture", "params", "integrity", "load",
                         "weights", "forward", "task vec", "L2 norm", "status"],
                        [_model_row(e, root, out) for e in models], right=(5, 6, 7, 8, 9, 10, 11))]
    if heads:
        lines += ["", out.bold(f"classification heads ({len(heads)})"),
                  table(["name", "form", "container", "file", "classes", "dim", "normalize", "paired with",
                         "integrity", "load", "logits", "status"], [_head_row(e, root, out) for e in heads],
                        right=(4, 5, 8, 9))]
    if report.integrity_checked:
        notes = [f"{e.label}: {e.integrity.detail}" for e in report.entries
                 if e.integrity and not e.integrity.checked]
        if notes:
            lines += ["", out.bold("integrity notes")] + [paragraph(n, prefix="  ", indent="    ") for n in notes]
    failed = report.failed
    if failed:
        lines += ["", out.bad(f"failures ({len(failed)})")]
        lines += [paragraph(f"{e.label}: {e.error}", prefix="  ", indent="    ") for e in failed]
    total = len(report.entries)
    counts = (f"{sum(e.ok for e in models)}/{len(models)} models, "
              f"{sum(e.ok for e in heads)}/{len(heads)} heads")
    crc = sum(e.timings.integrity_s or 0.0 for e in report.entries)
    took = f"in {human_time(report.seconds)}" + (f" (integrity pass {human_time(crc)})" if report.integrity_checked else "")
    if report.interrupted:
        summary = out.bad(f"interrupted after {total} entries") + f" ({counts} passed) {took}"
    elif report.ok:
        summary = out.ok(f"all {total} entries passed") + f" ({counts}) {took}"
    else:
        summary = out.bad(f"{len(failed)} of {total} entries failed") + f" ({counts} passed) {took}"
    lines += ["", summary]
    return "\n".join(lines)


def _model_row(e: EntryResult, root: Path | None, out: Style) -> list[str]:
    """A model's row: form, file, architecture (inferred and configured), parameters, times, task vector."""
    arch = e.architecture
    arch_cell = "-" if arch is None else (arch.inferred or "?")
    if arch is not None and arch.configured:
        arch_cell += " = config" if arch.inferred else f" (config: {arch.configured})"
    tv = e.task_vector
    tv_cell = "-" if tv is None else (f"{tv.l2_norm:.4g}" if tv.l2_norm is not None else "skipped")
    t = e.timings
    return [e.name, e.form, e.container or "-", rel(e.file, root), arch_cell,
            human_count(e.params) if e.params is not None else "-",
            _time(t.integrity_s), _time(t.load_s), _time(t.weights_s), _time(t.forward_s), _time(t.task_vector_s),
            tv_cell, _status(e.ok, out)]


def _head_row(e: EntryResult, root: Path | None, out: Style) -> list[str]:
    """A head's row: form, file, classes, input dimension, normalize, the model paired, load time, logits."""
    h = e.head or HeadCheck()
    logits = "x".join(map(str, h.logits)) + " ok" if h.logits and e.ok else "-"
    return [e.name, e.form, e.container or "-", rel(e.file, root),
            str(h.classes if h.classes is not None else "-"),
            str(h.input_dim if h.input_dim is not None else "-"),
            str(h.normalize).lower() if h.normalize is not None else "-", h.paired_with or "-",
            _time(e.timings.integrity_s), _time(e.timings.load_s), logits, _status(e.ok, out)]

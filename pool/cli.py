"""``python -m pool`` / ``openclip-pool``: verify, inspect, convert, synth, cache.

Exit status (one policy: `exit_status`): 0 all good; 1 the command ran and found a problem (an entry
failed, a file names unsafe globals, a conversion failed), or a bug / a closed output pipe; 2 the
command could not run as asked (usage, a missing or malformed config or input file, a destination
that exists without --force); 130 interrupted.
Errors are one paragraph on stderr; ``--debug`` adds the traceback and debug logging.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .allowlist import parse_allow_globals
from .errors import ConfigError, PoolError, UsageError, printable
from .report import Style, human_count, human_size, human_time, paragraph, table
from .unpickler import GlobalName
from .verify_report import EntryResult, HeadCheck, VerifyReport

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)

PROG = "openclip-pool"


# -- exit status: the one policy ----------------------------------------------------------------------
EXIT_OK = 0  #: all good
EXIT_FOUND = 1  #: the command ran and found a problem (an entry failed, unsafe globals, a failed conversion)
EXIT_USAGE = 2  #: the command could not run as asked (usage, config, a missing input, an existing destination)
EXIT_INTERRUPTED = 130  #: Ctrl-C


def exit_status(exc: BaseException, command: str | None) -> int:
    """The exit status for an error that ended ``command``.

    Usage and configuration errors, a missing input file and any ``OSError`` mean the command could
    not run as asked (2); so does an unreadable file given to ``inspect``, whose job is to read
    it. Any other `PoolError` is a problem the command found (1), as is a bug (1, reported as one).
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (UsageError, ConfigError, FileNotFoundError)):
        return EXIT_USAGE
    if isinstance(exc, PoolError):
        return EXIT_USAGE if command == "inspect" else EXIT_FOUND
    if isinstance(exc, OSError):
        return EXIT_USAGE
    return EXIT_FOUND


# -- plumbing -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _logging(debug: bool) -> Iterator[None]:
    """Library logs to stderr while the command runs: warnings, or everything with --debug."""
    logger = logging.getLogger("pool")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    if debug:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class _Progress:
    """A tqdm bar on stderr, only when stderr is a terminal (and stdout is not JSON)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and total > 0:
            from tqdm import tqdm

            try:
                columns = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 0
            # a pty with no size set reports 0 columns, which tqdm would draw as nothing
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="entry",
                            ncols=min(columns or 100, 120))
        self.started = False

    def tick(self, label: str) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(label, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


def _stderr_tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
        return text
    return str(exc) or type(exc).__name__


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda, cuda:1, mps ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu.")


def _rel(path: str | Path | None, root: Path | None) -> str:
    if path is None:
        return "-"
    p = Path(path)
    if root is not None:
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return str(p)


def _common_root(paths: Sequence[str]) -> Path | None:
    if not paths:
        return None
    try:
        common = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    except ValueError:
        return None
    if len(paths) == 1 or common.suffix in (".pt", ".safetensors") or (common.exists() and common.is_file()):
        common = common.parent
    return common


# -- verify ---------------------------------------------------------------------------------------
def _cmd_verify(args: argparse.Namespace, out: Style) -> int:
    from . import synth
    from .distributed import verify_distributed, world
    from .verify import prepare_pool, verify_pool

    _check_device(args.device)
    json_target = args.json
    if json_target not in (None, "-"):
        parent = Path(json_target).expanduser().absolute().parent
        if not parent.is_dir():
            raise UsageError(f"--json {json_target}: the folder {parent} does not exist.")

    def run(config: Path, label: str, note: str | None, *, cache: bool = True) -> int:
        pool, models, heads = prepare_pool(config, instantiate=not args.no_instantiate)
        pool.allow_globals |= parse_allow_globals(args.allow_global)
        if not cache:  # the embedded default: a temporary tree, nothing worth caching
            pool.cache_dir = False
        place = world()
        if place is not None:  # under torchrun: this rank's share, then every rank's results merged
            rank, size = place
            report, rank = verify_distributed(
                pool, models, heads, config_label=label, device=args.device, integrity=args.integrity,
                debug=args.debug, timeout_s=args.timeout, on_result=_EntryLines(0, prefix=f"[rank {rank}/{size}] "))
            if rank != 0:  # rank 0 alone prints and writes the report; every rank exits alike
                return EXIT_OK if report.ok else EXIT_FOUND
        else:
            total = len(models) + len(heads)
            bar = _stderr_tty() and json_target != "-"
            progress = _Progress(total, "verify", bar)
            stream = None if bar else _EntryLines(total)  # CI logs: one line per entry as it finishes
            try:
                report = verify_pool(pool, models, heads, config_label=label, device=args.device,
                                     integrity=args.integrity, debug=args.debug, progress=progress.tick,
                                     on_result=stream)
            finally:
                progress.close()
        report.note = note
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
        return EXIT_OK if report.ok else EXIT_FOUND

    if args.config is None:
        with tempfile.TemporaryDirectory(prefix="pool-verify-") as tmp:
            if _stderr_tty() and json_target != "-":
                print("synthesizing a tiny checkpoint tree ...", file=sys.stderr, end="\r", flush=True)
            tree = synth.write_tree(tmp)
            note = (f"embedded default: a tiny checkpoint tree in the task-arithmetic layout (every "
                    f"container and form, heads, {len(tree.tasks)} tasks), synthesized in {tmp} and "
                    "removed afterwards")
            return run(tree.config, "embedded default", note, cache=False)
    config = Path(args.config).expanduser()
    if config.is_dir():
        inside = [c.name for c in (config / "pool.yaml", config / "pool.safetensors.yaml") if c.is_file()]
        hint = f" It holds {', '.join(inside)}: pass that file." if inside else ""
        raise ConfigError(f"{config.absolute()} is a folder, not a pool config (YAML) file.{hint}")
    if not config.is_file():
        raise ConfigError(f"pool config not found: {config.absolute()}. Pass a pool YAML file, or no "
                          "argument to verify the embedded default.")
    return run(config, str(config.absolute()), None)


def _status(ok: bool, out: Style) -> str:
    return out.ok("PASS") if ok else out.bad("FAIL")


def _time(seconds: float | None) -> str:
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
                 (("load", t.load_s), ("weights", t.weights_s), ("forward", t.forward_s),
                  ("task vector", t.task_vector_s)) if value is not None]
        detail = ", ".join(steps) if e.ok else printable(e.error or "failed")
        count = f"{self.done:>{len(str(self.total))}}/{self.total}" if self.total else str(self.done)
        print(f"{self.prefix}verify [{count}] {'PASS' if e.ok else 'FAIL'} {e.label}: {detail}",
              file=sys.stderr, flush=True)


def _render_verify(report: VerifyReport, config: Path, out: Style) -> str:
    models, heads = report.models, report.heads
    # a file shown as its config text (${oc.env:NAME}/x.pt: see OpenCLIPVisionModelPool.redact) is no root
    root = _common_root([e.file for e in report.entries if e.file and os.path.isabs(e.file)])
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
        lines.append("  integrity  checked before loading: zip CRC32 of every member, safetensors headers "
                     "and offsets (legacy and pickle files carry no checksums)")
    else:
        lines.append("  integrity  " + out.warn("not checked") + " (add --integrity to check zip CRC32s and "
                     "safetensors headers before loading)")
    if models:
        rows = []
        for e in models:
            arch = e.architecture
            arch_cell = "-" if arch is None else (arch.inferred or "?")
            if arch is not None and arch.configured:
                arch_cell += " = config" if arch.inferred else f" (config: {arch.configured})"
            tv = e.task_vector
            tv_cell = "-" if tv is None else (f"{tv.l2_norm:.4g}" if tv.l2_norm is not None else "skipped")
            t = e.timings
            rows.append([e.name, e.form, e.container or "-", _rel(e.file, root), arch_cell,
                         human_count(e.params) if e.params is not None else "-",
                         _time(t.load_s), _time(t.weights_s), _time(t.forward_s), _time(t.task_vector_s),
                         tv_cell, _status(e.ok, out)])
        lines += ["", out.bold(f"models ({len(models)})"),
                  table(["name", "form", "container", "file", "architecture", "params", "load", "weights",
                         "forward", "task vec", "L2 norm", "status"], rows, right=(5, 6, 7, 8, 9, 10))]
    if heads:
        rows = []
        for e in heads:
            h = e.head or HeadCheck()
            logits = "x".join(map(str, h.logits)) + " ok" if h.logits and e.ok else "-"
            rows.append([e.name, e.form, e.container or "-", _rel(e.file, root),
                         str(h.classes if h.classes is not None else "-"),
                         str(h.input_dim if h.input_dim is not None else "-"),
                         str(h.normalize).lower() if h.normalize is not None else "-", h.paired_with or "-",
                         _time(e.timings.load_s), logits, _status(e.ok, out)])
        lines += ["", out.bold(f"classification heads ({len(heads)})"),
                  table(["name", "form", "container", "file", "classes", "dim", "normalize", "paired with",
                         "load", "logits", "status"], rows, right=(4, 5, 8))]
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
    if report.ok:
        summary = out.ok(f"all {total} entries passed") + f" ({counts}) in {human_time(report.seconds)}"
    else:
        summary = out.bad(f"{len(failed)} of {total} entries failed") + f" ({counts} passed) in {human_time(report.seconds)}"
    lines += ["", summary]
    return "\n".join(lines)


# -- inspect --------------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace, out: Style) -> int:
    from .checkpoint import sniff_container
    from .convert import sha256_file
    from .inspection import CONTAINER_NAMES, inspect_file

    path = Path(args.checkpoint).expanduser()
    from .containers.hf_folder import is_hf_folder

    if path.is_dir() and not is_hf_folder(path):
        raise UsageError(f"{path.absolute()} is a folder; inspect takes one checkpoint file (or a transformers "
                         "model folder: config.json beside model.safetensors).")
    # Missing files (the message lists what is near), pipes and devices (which could block the
    # hash below) are refused here, before the file is opened.
    sniff_container(path)
    info = inspect_file(path, sha256_file(path), allow_globals=args.allow_global)
    unsafe = info.unsafe
    if args.json:
        print(json.dumps(info.as_dict(), indent=2, default=str))
    else:
        rows = [
            ("file", printable(str(info.path.absolute()))),
            ("size", f"{human_size(info.size)} ({info.size:,} bytes)"),
            ("sha256", info.sha256),
            ("container", f"{info.container}: {CONTAINER_NAMES.get(info.container, info.container)}"),
        ]
        if info.error is None:  # names below come from the file: printable() escapes control characters
            rows += [("root type", printable(info.root_type or "-")), ("kind", printable(info.description)),
                     ("keys", printable(info.key_layout or "-")),
                     ("tensors", f"{info.tensors} ("
                      + ", ".join(f"{k} x{v}" for k, v in info.dtypes.items()) + ")"),
                     ("parameters", f"{info.parameters:,}" + (f" ({human_count(info.parameters)})"
                                                             if info.parameters >= 10_000 else ""))]
        else:
            rows.append(("tensors", "none: " + info.error.removeprefix(f"{info.path}: ")))
        for key, value in sorted(info.metadata.items()):
            rows.append((printable(f"metadata {key}"), printable(value)))
        if info.container != "safetensors":
            count = f"{len(info.globals)} named, " + (out.bad(f"{len(unsafe)} REFUSED (on no allowlist)") if unsafe
                                                      else "all allowed")
            rows.append(("globals", count))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        for g in sorted(info.globals, key=lambda g: (not g.unsafe, str(g))):
            lines.append(f"  {g}  " + _verdict(g, out))
        print("\n".join(lines))
    if unsafe or info.refusal:
        _error(printable(info.refusal) if info.refusal else
               f"{printable(str(path))}: names {len(unsafe)} global(s) on no allowlist: {', '.join(unsafe)}. They "
               "were listed, not executed; pool refuses to load this file. Get the checkpoint from a trusted source.",
               "inspect", args.prog)
        return EXIT_FOUND
    if info.error is not None:
        _error(info.error, "inspect", args.prog)
        return EXIT_USAGE
    return EXIT_OK


def _verdict(g: GlobalName, out: Style) -> str:
    """One global's verdict for ``inspect``: allowed (and the writer that needs it) or refused."""
    if g.unsafe:
        return out.bad("REFUSED: on no allowlist; torch.load(weights_only=False) or pickle.load would import "
                       "and call it")
    return f"{g.verdict} ({printable(g.writer)})"


# -- convert --------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace, out: Style) -> int:
    from .convert import convert_file, convert_to_hf, convert_tree, plan_tree
    from .errors import CheckpointNotFoundError, DestinationExistsError

    if args.tree:
        if args.source or args.destination:
            raise UsageError("convert takes either SRC DST or --tree DIR, not both.")
        if args.to != "safetensors":
            raise UsageError("--tree writes safetensors files; convert one encoder at a time with --to hf.")
        try:
            plan = plan_tree(args.tree, force=args.force)
        except DestinationExistsError as exc:
            raise UsageError(_message(exc)) from None
        progress = _Progress(len(plan.items), "convert", _stderr_tty())
        try:
            results, configs = convert_tree(plan, force=args.force,
                                            progress=lambda item: progress.tick(item.source.name))
        finally:
            progress.close()
        root = plan.root.absolute()
        rows = [[_rel(r.source.absolute(), root), _rel(r.destination.absolute(), root), r.kind or "-",
                 (r.model_name or "custom ViT") if r.kind == "encoder" else (r.architecture or "-"),
                 str(r.tensors or "-"), human_size(r.bytes) if r.bytes else "-",
                 out.ok(r.status) if r.ok else out.bad(r.status)] for r in results]
        lines = [out.bold(f"openclip-pool convert --tree {root}"),
                 table(["source", "safetensors", "kind", "architecture", "tensors", "size", "status"], rows,
                       right=(4, 5))]
        if plan.unplaced:
            lines += ["", paragraph("converted but named in no config (not zeroshot.pt, <Task>/finetuned.pt "
                                    "or head_<Task>.pt): " + ", ".join(_rel(p.absolute(), root) for p in plan.unplaced),
                                    prefix="  ", indent="  ")]
        failed = [r for r in results if not r.ok]
        if failed:
            lines += ["", out.bad(f"failures ({len(failed)})")]
            lines += [paragraph(f"{_rel(r.source.absolute(), root)}: {r.error}", prefix="  ", indent="    ") for r in failed]
            lines += ["", out.bad(f"{len(failed)} of {len(results)} files failed") + "; no config written "
                      "(fix or remove them and run again: converted files are kept and skipped as up to date)"]
            print("\n".join(lines))
            return EXIT_FOUND
        lines.append("")
        counts = {status: sum(r.status == status for r in results)
                  for status in ("converted", "up to date", "same tensors")}
        lines.append(out.ok(f"{len(results)} files: {counts['converted']} converted, {counts['up to date']} up to "
                            f"date, {counts['same tensors']} already held the same tensors (kept); all read "
                            "back bit-identical") + "; sources unchanged")
        for config in configs:
            lines.append(f"config: {config}")
            lines.append(f"  check it: python -m pool verify {config}")
        print("\n".join(lines))
        return EXIT_OK
    if not (args.source and args.destination):
        raise UsageError("convert needs SRC and DST (or --tree DIR); see `convert --help`.")
    try:
        if args.to == "hf":
            res = convert_to_hf(args.source, args.destination, force=args.force)
        else:
            res = convert_file(args.source, args.destination, force=args.force)
    except (DestinationExistsError, CheckpointNotFoundError) as exc:
        raise UsageError(_message(exc)) from None
    rows = [("converted", f"{res.source} -> {res.destination}"),
            ("kind", f"{res.kind}: " + (f"{res.model_name or 'a custom ViT'} ({res.architecture})"
                                         if res.kind == "encoder" else
                                         f"{res.architecture}, normalize={str(res.normalize).lower()}")),
            ("tensors", f"{res.tensors}, {human_size(res.bytes)} written, read back bit-identical"),
            ("source", f"sha256 {res.source_sha256} (never modified)"),
            ("time", human_time(res.seconds))]
    if res.kind == "encoder" and res.quick_gelu is not None:
        where = ("config.json as hidden_act=" + ("quick_gelu" if res.quick_gelu else "gelu")) if args.to == "hf" \
            else "the file's metadata"
        rows.insert(2, ("activation", f"{'QuickGELU' if res.quick_gelu else 'GELU'}, recorded in {where} "
                                      "(read back by pool; no config key needed)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return EXIT_OK


# -- synth ----------------------------------------------------------------------------------------
def _cmd_synth(args: argparse.Namespace, out: Style) -> int:
    from . import synth
    from .arch import arch_for_name

    arch: Any = synth.TINY
    if args.arch and args.arch.lower() != "tiny":
        arch_for_name(args.arch)  # ConfigError (exit 2) for an unknown name, listing known ones
        arch = args.arch
    tasks: Sequence[str] = synth.DEFAULT_TASKS
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if not all(c.isalnum() or c in "-_" for c in t)]
        if not tasks or bad:
            raise UsageError(f"--tasks {args.tasks!r}: give comma-separated task names made of letters, "
                             f"digits, - and _ (e.g. Cars,DTD,MNIST){'; bad: ' + ', '.join(bad) if bad else ''}.")
        lowered = [t.lower() for t in tasks]
        if len(set(lowered)) != len(lowered):
            raise UsageError(f"--tasks {args.tasks!r}: task names must differ (case-insensitively).")
    root = Path(args.directory).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder.")
    if (root / "pool.yaml").exists() and not args.force:
        raise UsageError(f"{root / 'pool.yaml'} exists; refusing to overwrite a checkpoint tree. Pass "
                         "--force to write over it, or choose an empty folder.")
    start = time.perf_counter()
    if _stderr_tty():
        print(f"writing a {arch if isinstance(arch, str) else 'tiny'} checkpoint tree ...", file=sys.stderr,
              end="\r", flush=True)
    tree = synth.write_tree(root, arch=arch, tasks=tasks)
    seconds = time.perf_counter() - start
    files = sorted(tree.files.values())
    total = sum(p.stat().st_size for p in files)
    rows = [[str(p.relative_to(tree.root)), human_size(p.stat().st_size)] for p in files]
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tree.config)
    lines = [out.bold(f"wrote a {tree.model_name or 'tiny'} checkpoint tree ({len(cfg.models)} models, "
                      f"{len(cfg.classification_heads)} heads, {human_size(total)}, random weights) in "
                      f"{human_time(seconds)}"),
             f"  root    {tree.root.absolute()}",
             f"  config  {tree.config.absolute()}",
             "",
             table(["file", "size"], rows, right=(1,)),
             "",
             f"next: python -m pool verify {tree.config}"]
    print("\n".join(lines))
    return EXIT_OK


# -- cache ------------------------------------------------------------------------------------------
def _cmd_cache(args: argparse.Namespace, out: Style) -> int:
    from .cache import CACHE_ENV, CheckpointCache, resolve_cache_dir

    root = resolve_cache_dir(args.cache_dir)
    if root is None:
        raise UsageError(f"no cache directory: pass --cache-dir DIR or set ${CACHE_ENV} (the conversion cache is "
                         "opt-in; a pool config's cache_dir: key sets it for that pool's loads).")
    cache = CheckpointCache(root)
    if args.action == "clear":
        removed, freed = cache.clear(only_unusable=args.unusable)
        what = "unusable entries" if args.unusable else "entries"
        print(f"removed {removed} {what}, {human_size(freed)}, from {cache.folder}")
        return EXIT_OK
    entries = sorted(cache.entries(), key=lambda e: str(e.source or e.index))
    total = sum(e.nbytes for e in entries)
    if args.json:
        print(json.dumps({"cache_dir": str(root.absolute()), "entries": [e.as_dict() for e in entries],
                          "bytes": total}, indent=2))
        return EXIT_OK
    counts = {status: sum(e.status == status for e in entries)
              for status in ("fresh", "stale", "missing", "damaged", "uncacheable", "orphan")}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "empty"
    lines = [out.bold(f"cache {root.absolute()}: {len(entries)} entries, {human_size(total)} ({summary})")]
    if entries:
        styled = {"fresh": out.ok, "stale": out.warn, "missing": out.warn, "damaged": out.bad,
                  "uncacheable": out.warn, "orphan": out.warn}
        rows = [[styled[e.status](e.status), e.container or "-", human_size(e.nbytes),
                 (printable(str(e.source)) if e.source else printable(e.index.name))
                 + (f" ({printable(e.reason[:120])})" if e.reason else "")] for e in entries]
        lines += ["", table(["status", "container", "size", "source"], rows, right=(2,))]
        if len(entries) > counts["fresh"]:
            lines += ["", f"remove the unusable ones with: {args.prog} cache clear --unusable"
                          + (f" --cache-dir {shlex.quote(str(root))}" if args.cache_dir else "")]
    print("\n".join(lines))
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------------
def _allow_global_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-global MODULE.NAME`` (repeatable): globals to accept besides pool's allowlist."""
    parser.add_argument("--allow-global", metavar="MODULE.NAME", action="append", default=[],
                        help="accept this exact global besides pool's allowlist (repeatable); it stays inert in "
                             "pool, but other readers of the file (torch.load(weights_only=False)) would call it")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line's parser: ``verify``, ``inspect``, ``convert``, ``synth`` and ``cache``.

    Each subcommand sets ``func``, the function `main` runs, and takes ``--debug``.

    Args:
        prog: the program name in usage and help text (default ``openclip-pool``).

    Returns:
        The parser (a command is required).

    Example:
        >>> args = build_parser().parse_args(["verify", "pool.yaml", "--integrity"])
        >>> args.command, args.config, args.integrity, args.device
        ('verify', 'pool.yaml', True, None)
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="debug logging, and tracebacks with errors")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Safe, offline loader for OpenCLIP vision-encoder pools: verify a pool, inspect a "
                    "checkpoint, convert checkpoints to safetensors, synthesize a test tree.",
        epilog="exit status: 0 all good; 1 a check failed (entry, unsafe globals, conversion); 2 usage or "
               "configuration error.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("verify", parents=[common], help="load and check every model and head of a pool",
                       description="Load every model and head of a pool one at a time and check them. Without "
                                   "CONFIG, verify an embedded default: a tiny checkpoint tree synthesized in a "
                                   "temporary folder.")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="pool YAML (default: the embedded tiny tree)")
    p.add_argument("--json", metavar="PATH", help="also write a machine-readable report to PATH ('-': stdout only)")
    p.add_argument("--integrity", action="store_true",
                   help="check zip CRC32s and safetensors headers before loading each file")
    p.add_argument("--device", metavar="D", help="device to load on and run the forward pass (default cpu; "
                                                 "under torchrun, cuda means each rank's own GPU)")
    p.add_argument("--no-instantiate", action="store_true",
                   help="data-only mode for a config from outside (a pull request's): refuse Hydra _target_ "
                        "entries and resolvers such as ${oc.env:...} instead of running them; plain ${a.b} "
                        "references still work")
    _allow_global_option(p)
    p.add_argument("--timeout", metavar="S", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others before failing (default 1800)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("inspect", parents=[common], help="describe a checkpoint file without loading it",
                       description="Container, every global the file names with its verdict (allowed, and "
                                   "the writer that needs it, or refused; nothing is executed), root type, "
                                   "architecture, tensors, parameters, size, sha256. Exit 1 when a load would "
                                   "refuse the file as unsafe.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _allow_global_option(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", parents=[common], help="convert checkpoints to safetensors",
                       description="Write SRC as safetensors at DST (or every .pt under --tree DIR beside the "
                                   "originals, plus DIR/pool.safetensors.yaml), or with --to hf as a transformers "
                                   "CLIPVisionModelWithProjection folder. SRC may be any checkpoint pool reads, a "
                                   "transformers CLIP folder included. Atomic writes; each file is read back and "
                                   "compared bit for bit; the source is never modified.")
    p.add_argument("source", nargs="?", metavar="SRC")
    p.add_argument("destination", nargs="?", metavar="DST")
    p.add_argument("--tree", metavar="DIR", help="convert a whole checkpoint tree and write a pool config")
    p.add_argument("--to", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors in pool's layout (default), or hf: a transformers folder (config.json, "
                        "model.safetensors, preprocessor_config.json)")
    p.add_argument("--force", action="store_true", help="overwrite existing destinations")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic checkpoint tree and its pool config",
                       description="Write a checkpoint tree in the task-arithmetic layout (every container and "
                                   "form, heads, zeroshot) with random weights, plus DIR/pool.yaml. No download.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--arch", metavar="NAME", help="open_clip ViT name, e.g. ViT-B-32 (default: a tiny ViT)")
    p.add_argument("--tasks", metavar="A,B,C", help="task names (default: Cars,DTD,EuroSAT,MNIST)")
    p.add_argument("--force", action="store_true", help="write over an existing tree")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("cache", parents=[common], help="list or clear the conversion cache",
                       description="The opt-in conversion cache ($OPENCLIP_POOL_CACHE_DIR, or a pool config's "
                                   "cache_dir:) keeps a safetensors copy of each pickled checkpoint after its first "
                                   "load. info lists its entries: fresh (served), stale (the source changed), "
                                   "missing (the source is gone), damaged (rebuilt on the next load), uncacheable "
                                   "(could not be copied; read directly) or orphan (left by an interrupted "
                                   "process); clear removes them.")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--cache-dir", metavar="DIR", help="the cache directory (default: $OPENCLIP_POOL_CACHE_DIR)")
    p.add_argument("--json", action="store_true", help="info: print JSON instead of text")
    p.add_argument("--unusable", action="store_true",
                   help="clear: remove all but the fresh entries")
    p.set_defaults(func=_cmd_cache)
    return parser


def _error(message: str, command: str | None, prog: str = PROG) -> None:
    where = f"{prog} {command}: " if command else f"{prog}: "
    style = Style(sys.stderr)
    print(paragraph(message, prefix=where + style.bad("error: ") if style.enabled else where + "error: "),
          file=sys.stderr)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one command; returns the exit status (never raises for a user's mistake).

    Every error is one paragraph on stderr (``--debug`` adds the traceback and debug logging);
    the exit status comes from one policy (`exit_status`).

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.
        prog: the program name in messages; None means ``openclip-pool``.

    Returns:
        0 all good (``--help`` and ``--version`` included); 1 the command ran and found a problem
        (an entry failed, a file names unsafe globals, a conversion failed; also a bug, or a
        closed output pipe); 2 it could not run as asked (usage, a missing or malformed config or
        input file, a destination that exists without ``--force``); 130 interrupted.

    Example:
        >>> from pool.cli import main
        >>> main(["inspect", "no-such-checkpoint.pt"])  # the error goes to stderr
        2
        >>> main(["verify", "pool.yaml", "--json", "report.json"])  # doctest: +SKIP
        0
    """
    parser = build_parser(prog or PROG)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    debug = bool(getattr(args, "debug", False))
    args.prog = parser.prog
    out = Style(sys.stdout)
    with _logging(debug):
        try:
            return int(args.func(args, out))
        except BrokenPipeError:  # e.g. `... | head`: stop quietly, as other command-line tools do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FOUND
        except KeyboardInterrupt as exc:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return exit_status(exc, args.command)
        except Exception as exc:  # noqa: BLE001 - every error is one paragraph; the traceback with --debug
            if debug:
                traceback.print_exc()
            if isinstance(exc, (PoolError, OSError)):
                message = _message(exc)
            else:  # a bug
                message = (f"unexpected {type(exc).__name__}: {printable(str(exc))}. This is a bug in pool; rerun "
                           "with --debug for the traceback and report it.")
            _error(message, args.command, parser.prog)
            return exit_status(exc, args.command)


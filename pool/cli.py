"""``python -m pool`` / ``openclip-pool``: verify, lock, atlas, inspect, convert, synth, cache.

Exit status (one policy: `exit_status`): 0 all good; 1 the command ran and found a problem (an entry
failed, a file names unsafe globals, a conversion failed), or a bug / a closed output pipe; 2 the
command could not run as asked (usage, a missing or malformed config or input file, a destination
that exists without --force); 130 interrupted.
Errors are one paragraph on stderr; ``--debug`` adds the traceback and debug logging.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from . import __version__
from .cli_common import EXIT_FOUND, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, error, message
from .errors import ConfigError, PoolError, UsageError, printable
from .report import Style

__all__ = ["main", "build_parser", "exit_status", "EXIT_OK", "EXIT_FOUND", "EXIT_USAGE", "EXIT_INTERRUPTED"]

#: A command's function: the parsed arguments and stdout's style in, the exit status out.
_Command = Callable[[argparse.Namespace, Style], int]


# -- exit status: the one policy (the codes: `pool.cli_common`) -------------------------------------
def exit_status(exc: BaseException, command: str | None) -> int:
    """The exit status for an error that ended ``command``.

    Usage and configuration errors, a missing input file and any ``OSError`` mean the command could
    not run as asked (2); so does an unreadable file given to ``inspect``, whose job is to read
    it. Any other `PoolError` is a problem the command found (1), as is a bug (1, reported as one).

    Args:
        exc: the error.
        command: the command it ended (None before one was chosen).

    Returns:
        `EXIT_INTERRUPTED`, `EXIT_USAGE` or `EXIT_FOUND`.
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


def _command(name: str) -> _Command:
    """The function that runs command ``name``: ``run`` of ``pool.cli_<name>``, imported when the
    command runs, so that ``--help``, ``--version`` and usage errors never import torch (seconds)."""

    def run(args: argparse.Namespace, out: Style) -> int:
        return importlib.import_module(f"{__package__}.cli_{name}").run(args, out)

    run.__qualname__ = run.__name__ = f"run_{name}"
    return run


# -- entry point ----------------------------------------------------------------------------------
def _allow_global_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-global MODULE.NAME`` (repeatable): globals to accept besides pool's allowlist."""
    parser.add_argument("--allow-global", metavar="MODULE.NAME", action="append", default=[],
                        help="accept this exact global besides pool's allowlist (repeatable); it stays inert in "
                             "pool, but other readers of the file (torch.load(weights_only=False)) would call it")


def _lock_options(parser: argparse.ArgumentParser) -> None:
    """``--locked`` and ``--lock PATH``: check every entry against the pool's lock file."""
    parser.add_argument("--locked", action="store_true",
                        help="fail every entry whose file or tensors drifted from the lock file (pool.lock beside "
                             "CONFIG, written by `python -m pool lock CONFIG`), and entries only one of them has")
    parser.add_argument("--lock", metavar="PATH", help="the lock file --locked reads (implies --locked; default: "
                                                       "pool.lock beside CONFIG)")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line's parser: ``verify``, ``lock``, ``atlas``, ``inspect``, ``convert``, ``synth`` and
    ``cache``.

    Each subcommand sets ``func``, the function `main` runs, and takes ``--debug``.

    Args:
        prog: the program name in usage and help text (default ``openclip-pool``).

    Returns:
        The parser (a command is required).

    Example:
        >>> args = build_parser().parse_args(["verify", "pool.yaml", "--locked"])
        >>> args.command, args.config, args.no_integrity, args.locked, args.device
        ('verify', 'pool.yaml', False, True, None)
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="debug logging, and tracebacks with errors")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Safe, offline loader for OpenCLIP vision-encoder pools: verify a pool, map its task "
                    "vectors, inspect a checkpoint, convert checkpoints to safetensors, synthesize a test tree.",
        epilog="exit status: 0 all good; 1 a check failed (entry, unsafe globals, conversion); 2 usage or "
               "configuration error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("verify", parents=[common], help="load and check every model and head of a pool",
                       description="Load every model and head of a pool one at a time and check them. Without "
                                   "CONFIG, verify an embedded default: a tiny checkpoint tree synthesized in a "
                                   "temporary folder.")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="pool YAML (default: the embedded tiny tree)")
    p.add_argument("--json", metavar="PATH", help="also write a machine-readable report to PATH ('-': stdout only)")
    p.add_argument("--no-integrity", action="store_true",
                   help="skip the integrity pass (zip CRC32s, safetensors headers) that runs before each load by "
                        "default: damaged bytes inside a zip checkpoint then load as wrong weights")
    p.add_argument("--integrity", action="store_true",
                   help="accepted for old command lines; does nothing: the integrity pass is the default")
    _lock_options(p)
    p.add_argument("--device", metavar="D", help="device to load on and run the forward pass (default cpu; "
                                                 "under torchrun, cuda means each rank's own GPU)")
    p.add_argument("--no-instantiate", action="store_true",
                   help="data-only mode for a config from outside (a pull request's): refuse Hydra _target_ "
                        "entries and resolvers such as ${oc.env:...} instead of running them; plain ${a.b} "
                        "references still work")
    _allow_global_option(p)
    p.add_argument("--timeout", metavar="S", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others before failing (default 1800)")
    p.set_defaults(func=_command("verify"))

    p = sub.add_parser("lock", parents=[common], help="approve a pool's files: write pool.lock beside its config",
                       description="Verify every entry of CONFIG (integrity pass included) and, when all pass, "
                                   "write its lock file (pool.lock beside CONFIG): per entry the path, size, sha256, "
                                   "container, architecture, the globals the file names and their verdicts, and a "
                                   "digest of the loaded tensors. Stable JSON (sorted keys, no times): diff it in "
                                   "review. `verify --locked` fails every entry that drifted from it.")
    p.add_argument("config", metavar="CONFIG", help="pool YAML")
    p.add_argument("--lock", metavar="PATH", help="write the lock here (default: pool.lock beside CONFIG)")
    p.add_argument("--device", metavar="D", help="device to load on (default cpu); the digests do not depend on it")
    p.add_argument("--no-instantiate", action="store_true",
                   help="data-only mode for a config from outside, as verify --no-instantiate")
    _allow_global_option(p)
    p.set_defaults(func=_command("lock"))

    p = sub.add_parser("atlas", parents=[common], help="task-vector atlas: cosine similarity, norms and sign "
                                                      "conflicts of a pool's task vectors",
                       description="Against _pretrained_, for every other model of CONFIG: the pairwise cosine "
                                   "similarity of the task vectors (whole and per block: embeddings, attention, "
                                   "MLP, norms, output, each layer), each task vector's norm per layer, and the "
                                   "pairwise sign-conflict rate. Streams tensor by tensor over mapped checkpoints "
                                   "in float64. Writes DIR/atlas.json and, with matplotlib, PNG figures.")
    p.add_argument("config", metavar="CONFIG", help="pool YAML (with a _pretrained_ model)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for atlas.json and the figures (created)")
    p.add_argument("--no-plots", action="store_true", help="write atlas.json only")
    p.add_argument("--no-instantiate", action="store_true",
                   help="data-only mode for a config from outside, as verify --no-instantiate")
    _allow_global_option(p)
    p.set_defaults(func=_command("atlas"))

    p = sub.add_parser("inspect", parents=[common], help="describe a checkpoint file without loading it",
                       description="Container, every global the file names with its verdict (allowed, and "
                                   "the writer that needs it, or refused; nothing is executed), root type, "
                                   "architecture, tensors, parameters, size, sha256. Exit 1 when a load would "
                                   "refuse the file as unsafe.")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _allow_global_option(p)
    p.set_defaults(func=_command("inspect"))

    p = sub.add_parser("convert", parents=[common], help="convert checkpoints to safetensors",
                       description="Write SRC as safetensors at DST (a torch state dict when DST ends in .pt, "
                                   ".pth or .bin; or every .pt under --tree DIR as safetensors beside the "
                                   "originals, plus DIR/pool.safetensors.yaml), or with --to hf as a transformers "
                                   "CLIPVisionModelWithProjection folder. SRC may be any checkpoint pool reads, a "
                                   "transformers CLIP folder included. Atomic writes; each file is read back and "
                                   "compared bit for bit; the source is never modified.")
    p.add_argument("source", nargs="?", metavar="SRC")
    p.add_argument("destination", nargs="?", metavar="DST")
    p.add_argument("--tree", metavar="DIR", help="convert a whole checkpoint tree and write a pool config")
    p.add_argument("--to", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors in pool's layout (default), or hf: a transformers folder (config.json, "
                        "model.safetensors, preprocessor_config.json and the tokenizer files: vocab.json, "
                        "merges.txt, tokenizer_config.json, special_tokens_map.json)")
    p.add_argument("--force", action="store_true", help="overwrite existing destinations")
    p.set_defaults(func=_command("convert"))

    p = sub.add_parser("synth", parents=[common], help="write a synthetic checkpoint tree and its pool config",
                       description="Write a checkpoint tree in the task-arithmetic layout (every container and "
                                   "form, heads, zeroshot) with random weights, plus DIR/pool.yaml. No download.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--arch", metavar="NAME", help="open_clip ViT name, e.g. ViT-B-32 (default: a tiny ViT)")
    p.add_argument("--tasks", metavar="A,B,C", help="task names (default: Cars,DTD,EuroSAT,MNIST)")
    p.add_argument("--force", action="store_true", help="write over an existing tree")
    p.set_defaults(func=_command("synth"))

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
    p.set_defaults(func=_command("cache"))
    return parser


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
                text = message(exc)
            else:  # a bug
                text = (f"unexpected {type(exc).__name__}: {printable(str(exc))}. This is a bug in pool; rerun "
                        "with --debug for the traceback and report it.")
            error(text, args.command, parser.prog)
            return exit_status(exc, args.command)


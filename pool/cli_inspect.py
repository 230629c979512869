"""``python -m pool inspect CKPT``: describe a checkpoint file without loading it (container,
every global it names with its verdict, root type, tensors, parameters, size, sha256)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checkpoint import sniff_container
from .cli_common import EXIT_FOUND, EXIT_OK, EXIT_USAGE, error
from .containers.hf_folder import is_hf_folder
from .convert_single import sha256_file
from .errors import UsageError, printable
from .inspection import CONTAINER_NAMES, inspect_file
from .report import Style, human_count, human_size
from .unpickler import GlobalName

__all__ = ["run"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``inspect`` as parsed (`pool.cli.build_parser`).

    Returns:
        The exit status (0 safe to load, 1 a load would refuse it, 2 it cannot be read).
    """
    path = Path(args.checkpoint).expanduser()
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
        error(printable(info.refusal) if info.refusal else
               f"{printable(str(path))}: names {len(unsafe)} global(s) on no allowlist: {', '.join(unsafe)}. They "
               "were listed, not executed; pool refuses to load this file. Get the checkpoint from a trusted source.",
               "inspect", args.prog)
        return EXIT_FOUND
    if info.error is not None:
        error(info.error, "inspect", args.prog)
        return EXIT_USAGE
    return EXIT_OK


def _verdict(g: GlobalName, out: Style) -> str:
    """One global's verdict for ``inspect``: allowed (and the writer that needs it) or refused."""
    if g.unsafe:
        return out.bad("REFUSED: on no allowlist; torch.load(weights_only=False) or pickle.load would import "
                       "and call it")
    return f"{g.verdict} ({printable(g.writer)})"

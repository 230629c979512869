"""``python -m pool convert SRC DST [--to hf]`` and ``convert --tree DIR``: convert checkpoints to
safetensors (a torch zip state dict for a ``.pt`` / ``.pth`` / ``.bin`` DST, a transformers folder
with ``--to hf``), and print what was written."""

from __future__ import annotations

import argparse

from .cli_common import EXIT_FOUND, EXIT_OK, message, rel, stderr_tty
from .cli_progress import Progress
from .convert import convert_tree, plan_tree
from .convert_single import ConvertResult, convert_file
from .errors import CheckpointNotFoundError, DestinationExistsError, UsageError
from .hf_export import convert_to_hf
from .report import Style, human_size, human_time, paragraph, table
from .saving import TORCH_SUFFIXES

__all__ = ["run"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``convert`` as parsed (`pool.cli.build_parser`).

    Returns:
        The exit status (0 converted, 1 a file failed).
    """
    if args.tree:
        return _convert_tree(args, out)
    return _convert_one(args, out)


def _convert_tree(args: argparse.Namespace, out: Style) -> int:
    """``convert --tree DIR``: every ``.pt`` under DIR, then the tree's pool config(s)."""
    if args.source or args.destination:
        raise UsageError("convert takes either SRC DST or --tree DIR, not both.")
    if args.to != "safetensors":
        raise UsageError("--tree writes safetensors files; convert one encoder at a time with --to hf.")
    try:
        plan = plan_tree(args.tree, force=args.force)
    except DestinationExistsError as exc:
        raise UsageError(message(exc)) from None
    progress = Progress(len(plan.items), "convert", stderr_tty())
    try:
        results, configs = convert_tree(plan, force=args.force,
                                        progress=lambda item: progress.tick(item.source.name))
    finally:
        progress.close()
    root = plan.root.absolute()
    rows = [[rel(r.source.absolute(), root), rel(r.destination.absolute(), root), r.kind or "-",
             (r.model_name or "custom ViT") if r.kind == "encoder" else (r.architecture or "-"),
             str(r.tensors or "-"), human_size(r.bytes) if r.bytes else "-",
             out.ok(r.status) if r.ok else out.bad(r.status)] for r in results]
    lines = [out.bold(f"openclip-pool convert --tree {root}"),
             table(["source", "safetensors", "kind", "architecture", "tensors", "size", "status"], rows,
                   right=(4, 5))]
    if plan.unplaced:
        lines += ["", paragraph("converted but named in no config (not zeroshot.pt, <Task>/finetuned.pt "
                                "or head_<Task>.pt): " + ", ".join(rel(p.absolute(), root) for p in plan.unplaced),
                                prefix="  ", indent="  ")]
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", out.bad(f"failures ({len(failed)})")]
        lines += [paragraph(f"{rel(r.source.absolute(), root)}: {r.error}", prefix="  ", indent="    ") for r in failed]
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


def _convert_one(args: argparse.Namespace, out: Style) -> int:
    """``convert SRC DST`` (``--to hf``: a transformers folder)."""
    if not (args.source and args.destination):
        raise UsageError("convert needs SRC and DST (or --tree DIR); see `convert --help`.")
    try:
        if args.to == "hf":
            res = convert_to_hf(args.source, args.destination, force=args.force)
        else:
            res = convert_file(args.source, args.destination, force=args.force)
    except (DestinationExistsError, CheckpointNotFoundError) as exc:
        raise UsageError(message(exc)) from None
    rows = [("converted", f"{res.source} -> {res.destination}"),
            ("kind", f"{res.kind}: " + (f"{res.model_name or 'a custom ViT'} ({res.architecture})"
                                         if res.kind == "encoder" else
                                         f"{res.architecture}, normalize={str(res.normalize).lower()}")),
            ("tensors", f"{res.tensors}, {human_size(res.bytes)} written, read back bit-identical"),
            ("source", f"sha256 {res.source_sha256} (never modified)"),
            ("time", human_time(res.seconds))]
    if res.kind == "encoder" and res.quick_gelu is not None:
        rows.insert(2, ("activation", f"{'QuickGELU' if res.quick_gelu else 'GELU'}, {_activation_kept(args, res)}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return EXIT_OK


def _activation_kept(args: argparse.Namespace, res: ConvertResult) -> str:
    """How the written file keeps an encoder's activation."""
    if args.to == "hf":
        return (f"recorded in config.json as hidden_act={'quick_gelu' if res.quick_gelu else 'gelu'} "
                "(read back by pool; no config key needed)")
    if res.destination.suffix.lower() in TORCH_SUFFIXES:
        return "the default for its shapes (a torch file records none; pool infers the same)"
    return "recorded in the file's metadata (read back by pool; no config key needed)"

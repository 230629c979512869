"""``python -m pool cache info|clear``: list the conversion cache's entries with their status, or
remove them (all, or the unusable ones)."""

from __future__ import annotations

import argparse
import json
import shlex

from .cache import CACHE_ENV, CheckpointCache, resolve_cache_dir
from .cli_common import EXIT_OK
from .errors import UsageError, printable
from .report import Style, human_size, table

__all__ = ["run"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``cache`` as parsed (`pool.cli.build_parser`).

    Returns:
        The exit status (0 listed or cleared).

    Raises:
        UsageError: no cache directory is given or set.
        NotACacheError: ``clear`` on a folder that is no conversion cache of this user's.
    """
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

"""``python -m pool lock CONFIG``: verify every entry of a pool (integrity pass included) and, when
all pass, write its lock file (`pool.lock`), which ``verify --locked`` checks entries against."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli_common import EXIT_FOUND, EXIT_OK
from .cli_verify import check_device, config_file, pool_from_args
from .errors import printable
from .lock import default_lock_path, render_lock, write_lock
from .report import Style, human_time, paragraph
from .verify import verify_pool

__all__ = ["run"]


def run(args: argparse.Namespace, out: Style) -> int:
    """Run ``lock`` as parsed (`pool.cli.build_parser`).

    Returns:
        0 the lock file was written; 1 an entry failed its checks (nothing written).

    Raises:
        UsageError: ``--device`` cannot be used.
        ConfigError: CONFIG is a folder, does not exist or cannot be read.
    """
    check_device(args.device)
    config = config_file(args.config)
    target = Path(args.lock).expanduser().absolute() if args.lock else default_lock_path(config)
    pool, models, heads = pool_from_args(config, args)
    records: dict[str, dict[str, Any]] = {}
    report = verify_pool(pool, models, heads, config_label=str(config.absolute()), device=args.device,
                         debug=args.debug, records=records, lock_dir=target.parent)
    if not report.ok:
        print(out.bad(f"{len(report.failed)} of {len(report.entries)} entries failed; {target} not written:"),
              file=sys.stderr)
        for entry in report.failed:
            print(paragraph(f"{entry.label}: {printable(entry.error or 'failed')}", prefix="  ", indent="    "),
                  file=sys.stderr)
        return EXIT_FOUND
    text = render_lock(config.name, records)
    unchanged = target.is_file() and target.read_text(encoding="ascii", errors="replace") == text
    if not unchanged:
        write_lock(target, text)
    verb = "unchanged" if unchanged else "written"
    print(f"{target} {verb}: {len(records)} entries locked (size, sha256, container, architecture, globals, "
          f"tensors digest) in {human_time(report.seconds)}")
    return EXIT_OK

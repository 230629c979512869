"""``python -m pool``: see `pool.cli`.

``python -m`` looks in the working directory first, so a folder named ``pool`` there (without an
``__init__.py``) can shadow an editable install: Python then makes ``pool`` a namespace package,
runs this file from it, and ``pool/__init__.py`` never runs. That case is told apart here, before
`pool.cli` is imported, and explained in one message instead of an ImportError traceback. The
console script ``openclip-pool`` never looks in the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The exit status for a command that cannot run as asked (`pool.cli_common.EXIT_USAGE`).
_EXIT_USAGE = 2


def shadowed_message() -> str | None:
    """Why ``pool`` was imported as a namespace package (a folder named ``pool`` without
    ``__init__.py`` ahead of the installed package), or None when it was imported normally.

    Returns:
        The message naming the shadowing folders and the fixes, or None.
    """
    package = sys.modules.get(__package__ or "pool")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    folders = [str(Path(p).absolute()) for p in getattr(package, "__path__", [])
               if not (Path(p) / "__init__.py").is_file()]
    return (f"python -m pool: the folder {' and '.join(folders) or 'pool'} (no __init__.py) shadows the installed "
            "pool package: `python -m` looks in the working directory first. Run the console script instead "
            "(openclip-pool COMMAND ..., which does not look there), or run from another folder.")


if __name__ == "__main__":
    problem = shadowed_message()
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(_EXIT_USAGE)
    from .cli import main  # after the check: importing pool.cli fails when pool is shadowed

    sys.exit(main(prog="python -m pool"))

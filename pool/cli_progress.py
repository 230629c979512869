"""A progress bar on stderr for the long commands (``verify``, ``convert --tree``)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """A tqdm bar on stderr, only when stderr is a terminal (and stdout is not JSON).

    Args:
        total: the steps (entries, files).
        desc: the bar's label.
        enabled: draw it; False: every call does nothing.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and total > 0:
            try:
                columns = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 0
            # a pty with no size set reports 0 columns, which tqdm would draw as nothing
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="entry",
                            ncols=min(columns or 100, 120))
        self.started = False

    def tick(self, label: str) -> None:
        """A step starts: the previous one is done.

        Args:
            label: what the step works on, shown beside the bar.
        """
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(label, refresh=True)

    def close(self) -> None:
        """The last step is done; the bar goes."""
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()

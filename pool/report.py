"""Output for people: human sizes, times and counts, aligned tables, optional colour.

Used by the CLI (`pool.cli`); nothing here touches checkpoints.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import IO

__all__ = ["human_size", "human_time", "human_count", "Style", "table", "paragraph"]


def human_size(nbytes: int | float) -> str:
    """A byte count for people: ``1536`` -> ``1.5 KiB``; bytes below 1 KiB stay exact.

    Args:
        nbytes: the number of bytes.

    Returns:
        The size in B, KiB, MiB, GiB or TiB (one decimal below 100 of a unit).

    Example:
        >>> human_size(512), human_size(1536), human_size(3 * 1024**3)
        ('512 B', '1.5 KiB', '3.0 GiB')
    """
    value = float(nbytes)
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def human_time(seconds: float) -> str:
    """A duration for people: ``0.0123`` -> ``12 ms``, ``1.234`` -> ``1.23 s``, ``75`` -> ``1 min 15 s``.

    Args:
        seconds: the duration in seconds.

    Returns:
        The duration in ms (one decimal below 10 ms), s, or min and s.

    Example:
        >>> human_time(0.0123), human_time(1.234), human_time(75)
        ('12 ms', '1.23 s', '1 min 15 s')
    """
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s"


def human_count(n: int) -> str:
    """A count for people: ``87849216`` -> ``87.85 M``; small counts exact with separators.

    Args:
        n: the count.

    Returns:
        The count exact below 10,000, else in k, M or G.

    Example:
        >>> human_count(9999), human_count(87849216)
        ('9,999', '87.85 M')
    """
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1e3:.1f} k"
    if n < 1_000_000_000:
        return f"{n / 1e6:.2f} M"
    return f"{n / 1e9:.2f} G"


class Style:
    """ANSI colour, on only for a terminal and when ``NO_COLOR`` is unset (https://no-color.org).

    Each method returns its text in one style, or unchanged when colour is off.

    Args:
        stream: the stream the text goes to (default ``sys.stdout``); colour is on when it is a
            terminal, ``NO_COLOR`` is unset and ``TERM`` is not ``dumb``.
        enabled: force colour on (True) or off (False); None decides from ``stream``.

    Example:
        >>> Style(enabled=True).bad("FAIL"), Style(enabled=False).bad("FAIL")
        ('\\x1b[1;31mFAIL\\x1b[0m', 'FAIL')
    """

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        if enabled is None:
            stream = stream if stream is not None else sys.stdout
            enabled = (hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")
                       and os.environ.get("TERM") != "dumb")
        self.enabled = bool(enabled)

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled and text else text

    def ok(self, text: str) -> str:
        """Green, for what passed.

        Args:
            text: the text to style.

        Returns:
            ``text`` in green, or unchanged when colour is off (or ``text`` is empty).
        """
        return self._wrap("32", text)

    def bad(self, text: str) -> str:
        """Bold red, for failures and unsafe globals.

        Args:
            text: the text to style.

        Returns:
            ``text`` in bold red, or unchanged when colour is off (or ``text`` is empty).
        """
        return self._wrap("1;31", text)

    def warn(self, text: str) -> str:
        """Yellow, for warnings.

        Args:
            text: the text to style.

        Returns:
            ``text`` in yellow, or unchanged when colour is off (or ``text`` is empty).
        """
        return self._wrap("33", text)

    def dim(self, text: str) -> str:
        """Faint, for asides.

        Args:
            text: the text to style.

        Returns:
            ``text`` faint, or unchanged when colour is off (or ``text`` is empty).
        """
        return self._wrap("2", text)

    def bold(self, text: str) -> str:
        """Bold, for titles and table headers.

        Args:
            text: the text to style.

        Returns:
            ``text`` in bold, or unchanged when colour is off (or ``text`` is empty).
        """
        return self._wrap("1", text)


def _visible_len(text: str) -> int:
    out, i = 0, 0
    while i < len(text):
        if text[i] == "\033":
            end = text.find("m", i)
            i = end + 1 if end >= 0 else len(text)
            continue
        out += 1
        i += 1
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "  ",
          right: Sequence[int] = (), header_style: Style | None = None) -> str:
    """An aligned text table; columns listed in ``right`` are right-aligned (numbers).

    Widths ignore ANSI colour codes, so styled cells line up.

    Args:
        headers: the column titles.
        rows: the cells, one sequence per row (no longer than ``headers``).
        indent: put before every line.
        right: the indices of the columns to right-align.
        header_style: a `Style` whose ``bold`` the header line gets; None leaves it plain.

    Returns:
        The header line and one line per row, joined by newlines, trailing spaces stripped.

    Example:
        >>> print(table(["name", "size"], [["a.pt", "1.5 KiB"], ["bb.pt", "12 B"]], right=(1,)))
          name      size
          a.pt   1.5 KiB
          bb.pt     12 B
    """
    widths = [_visible_len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _visible_len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - _visible_len(cell))
            parts.append(pad + cell if i in right else cell + pad)
        return (indent + "  ".join(parts)).rstrip()

    head = line(list(headers))
    if header_style is not None:
        head = header_style.bold(head)
    return "\n".join([head, *(line(r) for r in rows)])


def paragraph(text: str, *, prefix: str = "", indent: str = "", width: int | None = None) -> str:
    """Wrap a message into one paragraph; paths and long words are never broken.

    Args:
        text: the message; its whitespace (newlines included) is collapsed.
        prefix: put before the first line (``"openclip-pool: error: "``).
        indent: put before the other lines; empty (the default) means as many spaces as the
            prefix is long, at most 4.
        width: the line width; None means the terminal's, kept between 60 and 100.

    Returns:
        The wrapped paragraph.

    Example:
        >>> print(paragraph("one two three four five", prefix="error: ", width=20))
        error: one two three
            four five
    """
    if width is None:
        width = min(100, max(60, shutil.get_terminal_size((100, 24)).columns))
    return textwrap.fill(" ".join(text.split()), width=width, initial_indent=prefix,
                         subsequent_indent=indent or " " * min(len(prefix), 4),
                         break_long_words=False, break_on_hyphens=False)

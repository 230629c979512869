"""Telling formats apart by a file's first bytes: shared by the containers' ``sniff`` and
``diagnose`` and by `pool.checkpoint`'s messages for files no container accepts."""

from __future__ import annotations

__all__ = ["as_text"]


def as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 if it is printable text (a character cut at the end is allowed).

    Args:
        head: a file's first bytes.

    Returns:
        The text (without a character cut off at the end), or None when the bytes are not
        printable UTF-8 text (or empty).

    Example:
        >>> as_text(b"version https://git-lfs"), as_text(b"PK\\x03\\x04")
        ('version https://git-lfs', None)
    """
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return None
        decoded = head[:exc.start].decode("utf-8")
    if decoded and all(c.isprintable() or c in "\r\n\t\f\v" for c in decoded):
        return decoded
    return None

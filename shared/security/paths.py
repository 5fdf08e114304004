"""File names that come from records are untrusted: they may only name a plain file directly
inside the folder chosen by the user.

A record (an overlay's name in ``ResultsReady``, written by whoever can write that topic) could
say ``../../.bashrc`` or ``/etc/cron.d/x``; :func:`child` refuses every such name, and
:func:`write_new` writes without following a link an attacker may have left in the folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeName(ValueError):
    """A name from a record that would leave the folder (or is no plain file name)."""


def child(folder: Path, name: str) -> Path:
    """``folder / name`` when ``name`` is one plain component (letters, digits, ``._-``, not
    starting with a dot, no ``..``); :class:`UnsafeName` otherwise. The message never quotes
    the name (it came from a record)."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise UnsafeName("a file name from a record is not a plain name inside the folder")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise UnsafeName("a file name from a record resolves outside the folder")
    return path


def write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to :func:`child` ``(folder, name)``, never through a symbolic link
    (``O_NOFOLLOW``): a link left there is an error, not a redirection."""
    path = child(folder, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise UnsafeName(f"cannot write a record's file in the folder ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path

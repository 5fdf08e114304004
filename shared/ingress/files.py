"""Reading files to publish without trusting their size: a file is never read past what could
be sent (the broker's message cap), and the series it belongs to is read from a bounded prefix
(``radstream publish`` used to read a whole file to slice its first MiB off)."""

from __future__ import annotations

from pathlib import Path

from shared.dicom.safe import series_uid_or_none

KEY_PREFIX = 4 * 1024 * 1024  # where a SeriesInstanceUID is looked for


class TooLarge(ValueError):
    """The file is larger than the cap: it is not read."""


def read_capped(path: Path, cap: int) -> bytes:
    """The file's bytes, or :class:`TooLarge` (judged by its size first, and by at most
    ``cap + 1`` bytes read, should it have grown meanwhile)."""
    if path.stat().st_size > cap:
        raise TooLarge(f"larger than the {cap} byte cap")
    with path.open("rb") as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise TooLarge(f"larger than the {cap} byte cap")
    return data


def series_of(path: Path, prefix: int = KEY_PREFIX) -> str | None:
    """The SeriesInstanceUID in the first ``prefix`` bytes of the file (None if not there)."""
    with path.open("rb") as fh:
        return series_uid_or_none(fh.read(prefix))

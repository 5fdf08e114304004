"""Errors of the imaging layer: an image or volume that can never be processed.

They are poison inputs (the runtime dead-letters them with their reason code at once); the
message never quotes a value from the data. Reason codes:

* ``not_an_image``: the instance has no pixel data;
* ``undecodable``: the pixel data cannot be decoded (or crashed the decoder), or a stored
  (packed) volume cannot be unpacked;
* ``empty_series``, ``mixed_geometry``, ``bad_geometry``, ``duplicate_slices``,
  ``inconsistent_spacing``: the slices do not make one volume;
* ``missing_functional_groups``: an enhanced multi-frame instance whose functional groups do
  not describe each of its frames;
* ``volume_too_large``: more voxels (or frames) than the configured cap.

Every code is also a member of the stages' one closed set of dead-letter reasons.
"""

from __future__ import annotations

from shared.runtime.errors import PoisonError

REASONS = frozenset(
    {
        "not_an_image",
        "undecodable",
        "empty_series",
        "mixed_geometry",
        "bad_geometry",
        "duplicate_slices",
        "inconsistent_spacing",
        "volume_too_large",
        "missing_functional_groups",
    }
)


class ImagingError(PoisonError):
    """Poison for imaging reasons; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown imaging reason {reason!r}")
        super().__init__(reason, message)

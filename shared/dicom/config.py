"""pydicom (and highdicom), configured once per process.

The ``warnings`` module's filters and pydicom's settings are process-global; handlers run in
threads. So nothing here is set per call (``warnings.catch_warnings()`` in a handler thread
races every other thread's filters): the libraries are configured once, when
:mod:`shared.dicom` is imported, so that the paths RadStream uses do not warn at all:

* reading: values are never validated by pydicom (``IGNORE``): :mod:`shared.dicom.safe` judges
  the values it needs itself, with documented reason codes, and pydicom's validation messages
  quote the offending value, which may be PHI;
* writing: the same for the objects we build (SEG): values copied from accepted sources are not
  re-judged on the way out (the objects themselves are validated by highdicom when built and
  by ``dciodvfy`` in the tests).

What pydicom still warns about (rare: a charset it does not know, a leap second) goes to the
``warnings`` module and to the ``pydicom`` logger; services route both through
:func:`shared.runtime.service.configure_logging`, which withholds their text.
"""

from __future__ import annotations

import pydicom.config

_LIBRARY_LOGGERS = ("pydicom", "highdicom")


def configure_pydicom() -> None:
    """Idempotent; called at import of :mod:`shared.dicom` and again at service start-up."""
    settings = pydicom.config.settings
    settings.reading_validation_mode = pydicom.config.IGNORE
    settings.writing_validation_mode = pydicom.config.IGNORE


def library_loggers() -> tuple[str, ...]:
    """Loggers of the DICOM libraries, whose messages may quote values from a file."""
    return _LIBRARY_LOGGERS

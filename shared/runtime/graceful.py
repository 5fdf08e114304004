"""SIGTERM before the event loop runs: exit 0 at once.

A service spends its first seconds importing NumPy, SciPy, highdicom, aiokafka... and building
its stage; the runtime's own SIGTERM handling starts with the event loop. Kubernetes (and the
tests) may stop a pod at any moment, so each service's ``main`` module calls
:func:`exit_on_sigterm` before its heavy imports: a SIGTERM in that window raises
``SystemExit(0)`` in the main thread (nothing is in flight yet). The event loop replaces this
handler with its graceful shutdown as soon as it starts.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    sys.exit(0)


def exit_on_sigterm(module_name: str) -> None:
    """Install the early handler, only when ``module_name`` is the program (``__main__``)."""
    if module_name == "__main__":
        signal.signal(signal.SIGTERM, _exit)

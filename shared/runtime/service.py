"""Process entry point shared by every service: settings, keyring, logging, signals, exit code."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from shared.config import Settings
from shared.dicom.config import configure_pydicom, library_loggers
from shared.runtime.stage import StageRunner, StageSpec
from shared.security.envelope import Keyring
from shared.security.kek import keyring_for


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


_WARNING_HEAD = re.compile(r"^(?P<path>[^\n]*?):(?P<line>\d+): (?P<category>\w+):")


class WithholdDicomText(logging.Filter):
    """Keep that a DICOM library or the ``warnings`` module said something, never what.

    pydicom's and highdicom's messages (and warnings, which pydicom also logs) can quote a
    value read from a file: a name, an ID, a UID. This filter, on the process's one handler,
    rewrites such records to their origin and category before anything formats them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            args = record.args
            text = str(args[0]) if isinstance(args, tuple) and args else str(record.msg)
            head = _WARNING_HEAD.match(text)
            where = (
                f"{head['category']} at {os.path.basename(head['path'])}:{head['line']}"
                if head
                else "a warning"
            )
            self._withhold(record, f"{where} (text withheld: it may quote DICOM values)")
        elif record.name.split(".", 1)[0] in library_loggers():
            self._withhold(
                record,
                f"{record.name} {record.levelname.lower()} "
                "(text withheld: it may quote DICOM values)",
            )
        return True

    @staticmethod
    def _withhold(record: logging.LogRecord, text: str) -> None:
        record.msg, record.args = text, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None


def configure_logging(level: str = "INFO") -> None:
    """Once per process, before any handler thread starts: JSON lines on stderr; warnings
    routed to logging and, like the DICOM libraries' own messages, withheld
    (:class:`WithholdDicomText`); noisy clients quietened."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    handler.addFilter(WithholdDicomText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.showwarning → "py.warnings" → the filter above
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # highdicom logs attribute copies with the study's UID at INFO: never let that through
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pynetdicom logs request identifiers (datasets) at INFO
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def configure_process(level: str = "INFO") -> None:
    """A service's one-time start-up: logging, then the DICOM libraries (process-global
    settings are set here, in the main thread, never from a handler)."""
    configure_logging(level)
    configure_pydicom()


async def _serve(runner: StageRunner[Any]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    await runner.run()


def run_stage(
    spec: StageSpec[Any] | Callable[[Keyring, CollectorRegistry], StageSpec[Any]],
    settings: Settings | None = None,
) -> int:
    """Run one stage until SIGTERM/SIGINT; returns the process exit code. ``spec`` may be a
    builder taking the keyring and the metrics registry (for services with own metrics)."""
    configure_process()
    settings = settings or Settings()
    keyring = keyring_for(settings)
    registry = CollectorRegistry()
    built = spec if isinstance(spec, StageSpec) else spec(keyring, registry)
    runner = StageRunner(built, settings, keyring, registry)
    asyncio.run(_serve(runner))
    _leave_busy_handlers(HANDLER_JOIN_S)
    return 0


HANDLER_JOIN_S = 1.0  # after the stage stopped: how long a handler thread may still run


def _leave_busy_handlers(bound_s: float) -> None:
    """Python joins executor threads at exit, so a handler still computing (its result can no
    longer be committed: the transaction is gone) would hold the process past the stop's bound.
    Give the handler threads ``bound_s``, then exit without them: their work is uncommitted
    and the next owner of the partition redoes it."""
    deadline = time.monotonic() + bound_s
    main = threading.main_thread()
    busy = [t for t in threading.enumerate() if t is not main and not t.daemon]
    for thread in busy:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = sum(t.is_alive() for t in busy)
    if left:
        logging.getLogger("radstream.runtime").warning(
            "stopped with %d handler thread(s) still busy; their work is redone by the next owner",
            left,
        )
        logging.shutdown()
        os._exit(0)


def serve(
    build: Callable[[Settings, Keyring, CollectorRegistry], StageSpec[Any]],
    settings: Settings | None = None,
) -> int:
    """A service's ``main``: settings (from the environment unless given), then
    :func:`run_stage`."""
    settings = settings or Settings()
    return run_stage(lambda keyring, registry: build(settings, keyring, registry), settings)

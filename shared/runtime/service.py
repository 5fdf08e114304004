"""Process entry point shared by every service: settings, keyring, logging, signals, exit code."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from shared.config import Settings
from shared.runtime.stage import StageRunner, StageSpec
from shared.security.envelope import Keyring


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


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # highdicom logs attribute copies with the study's UID at INFO: never let that through
    logging.getLogger("highdicom").setLevel(logging.WARNING)


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
    configure_logging()
    settings = settings or Settings()
    keyring = Keyring.from_file(settings.keyring_path)
    registry = CollectorRegistry()
    built = spec if isinstance(spec, StageSpec) else spec(keyring, registry)
    runner = StageRunner(built, settings, keyring, registry)
    asyncio.run(_serve(runner))
    return 0


def serve(build: Callable[[Settings, Keyring, CollectorRegistry], StageSpec[Any]]) -> int:
    """A service's ``main``: settings from the environment, then :func:`run_stage`."""
    settings = Settings()
    return run_stage(lambda keyring, registry: build(settings, keyring, registry), settings)

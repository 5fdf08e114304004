"""Audit sequencer service: ``audit.in.<principal>`` → hash-chained ``audit`` (as auditlog)."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the imports below exits 0

import asyncio  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.auditlog.core import Sequencer  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.metrics import HealthServer  # noqa: E402
from shared.runtime.service import configure_process  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.security.kek import keyring_for  # noqa: E402


@dataclass
class AuditlogService:
    """The sequencer and its /metrics, /healthz, /readyz (ready once it chains)."""

    sequencer: Sequencer
    http: HealthServer


def build(settings: Settings, keyring: Keyring, registry: CollectorRegistry) -> AuditlogService:
    """Wire the sequencer (nothing connects until it runs)."""
    seq = Sequencer(settings, keyring, registry)
    http = HealthServer(registry, settings.metrics_host, settings.metrics_port, lambda: seq.ready)
    return AuditlogService(seq, http)


async def serve(settings: Settings) -> None:
    svc = build(settings, keyring_for(settings), CollectorRegistry())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await svc.http.start()
    try:
        await svc.sequencer.run_until_stopped(stop)
    finally:
        await svc.http.stop()


def main() -> int:
    configure_process()
    asyncio.run(serve(Settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

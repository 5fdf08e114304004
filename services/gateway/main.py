"""Gateway service: DICOM C-STORE SCP → ``instances`` (as the gateway principal)."""

from __future__ import annotations

import asyncio
import signal
import sys

from prometheus_client import CollectorRegistry

from services.gateway.core import Gateway, GatewayMetrics
from shared.config import Settings
from shared.ingress.publisher import Publisher
from shared.metrics import HealthServer
from shared.runtime.service import configure_process
from shared.security.envelope import Keyring


async def serve(settings: Settings) -> None:
    keyring = Keyring.from_file(settings.keyring_path)
    registry = CollectorRegistry()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = False
    http = HealthServer(registry, settings.metrics_host, settings.metrics_port, lambda: ready)
    await http.start()
    publisher = Publisher(
        settings.kafka, keyring, source=settings.gateway.source, topic=settings.topic("instances")
    )
    await publisher.start()
    gateway = Gateway(settings.gateway, publisher, loop, GatewayMetrics(registry))
    try:
        await asyncio.to_thread(gateway.start)
        ready = True
        await stop.wait()
    finally:
        ready = False
        await asyncio.to_thread(gateway.stop)  # waits for open associations' handlers
        await publisher.stop()
        await http.stop()


def main() -> int:
    configure_process()
    asyncio.run(serve(Settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gateway service: DICOM C-STORE SCP → ``instances`` (as the gateway principal)."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import asyncio  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.gateway.core import Gateway, GatewayMetrics  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.ingress.publisher import Publisher  # noqa: E402
from shared.metrics import HealthServer  # noqa: E402
from shared.runtime.service import configure_process  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402


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

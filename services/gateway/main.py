"""Gateway service: DICOM C-STORE SCP and DICOMweb STOW-RS → ``instances`` (as the gateway
principal), both through one publisher."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import asyncio  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.gateway.core import Gateway, GatewayMetrics, check_settings  # noqa: E402
from services.gateway.stow import StowCore, StowMetrics, StowServer  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.ingress.publisher import Publisher  # noqa: E402
from shared.metrics import HealthServer  # noqa: E402
from shared.runtime.service import configure_process  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.security.kek import keyring_for  # noqa: E402
from shared.topology import DEADLETTER, party  # noqa: E402

OUTPUT = party("gateway").write[0]  # the topic the gateway publishes instances to


@dataclass
class GatewayService:
    """What the gateway process runs: /metrics + /healthz + /readyz, the Kafka publisher, the
    DICOM SCP and (when a port is set) the STOW-RS endpoint. Ready once both listen."""

    settings: Settings
    publisher: Publisher
    registry: CollectorRegistry
    metrics: GatewayMetrics = field(init=False)
    http: HealthServer = field(init=False)
    gateway: Gateway | None = field(default=None, init=False)
    stow: StowServer | None = field(default=None, init=False)
    stow_metrics: StowMetrics = field(init=False)  # exported even with STOW-RS off
    ready: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.metrics = GatewayMetrics(self.registry)
        self.stow_metrics = StowMetrics(self.registry)
        self.http = HealthServer(
            self.registry,
            self.settings.metrics_host,
            self.settings.metrics_port,
            lambda: self.ready,
        )

    async def start(self) -> None:
        await self.http.start()
        await self.publisher.start()
        self.gateway = Gateway(
            self.settings.gateway,
            self.publisher,
            asyncio.get_running_loop(),
            self.metrics,
            audit_topic=self.settings.audit_topic(),
        )
        await asyncio.to_thread(self.gateway.start)
        if self.settings.gateway.stow.port is not None:
            self.stow = StowServer(
                StowCore(
                    self.settings.gateway.stow,
                    self.publisher,
                    deadletter_topic=self.settings.topic(DEADLETTER),
                    audit_topic=self.settings.audit_topic(),  # its own intake topic
                    max_message_bytes=self.settings.kafka.max_message_bytes,
                    metrics=self.stow_metrics,
                )
            )
            await self.stow.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.gateway is not None:
            await asyncio.to_thread(self.gateway.stop)  # waits for open associations' handlers
        if self.stow is not None:
            await self.stow.stop()  # finishes requests in flight
        await self.publisher.stop()
        await self.http.stop()


def build(settings: Settings, keyring: Keyring, registry: CollectorRegistry) -> GatewayService:
    """Wire the gateway (nothing connects or listens until :meth:`GatewayService.start`);
    settings that leave DICOM unprotected outside the local demo are refused here."""
    check_settings(settings.gateway)
    publisher = Publisher(
        settings.kafka, keyring, source=settings.gateway.source, topic=settings.topic(OUTPUT)
    )
    return GatewayService(settings, publisher, registry)


async def serve(settings: Settings) -> None:
    svc = build(settings, keyring_for(settings), CollectorRegistry())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await svc.start()
        await stop.wait()
    finally:
        await svc.stop()


def main() -> int:
    configure_process()
    asyncio.run(serve(Settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

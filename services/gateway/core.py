"""DICOM C-STORE gateway: modalities that speak DIMSE hand instances to Kafka through it.

* C-STORE success (0x0000) is answered only after the broker acknowledged the instance, so
  nothing a modality was told is stored can be lost; otherwise 0xA700 (out of resources),
  and the modality retries.
* On association release, one end-of-series marker per series seen in the association, with
  the count of instances stored. An aborted association sends no marker: ingest completes
  those series on its inactivity timeout.
* Only configured calling AE titles are accepted (rejected at association time), optionally
  only from configured addresses; C-ECHO answers; DICOM TLS when a certificate is set.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from shared.config import GatewaySettings
from shared.ingress.publisher import Publisher, PublishError

log = logging.getLogger("radstream.gateway")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Counter(
            "radstream_gateway_instances",
            "C-STORE requests by outcome",
            ["outcome"],
            registry=registry,
        )
        self.associations = Counter(
            "radstream_gateway_associations",
            "Associations by outcome",
            ["outcome"],
            registry=registry,
        )
        self.markers = Counter(
            "radstream_gateway_end_of_series", "End-of-series markers sent", registry=registry
        )
        self.open = Gauge(
            "radstream_gateway_open_associations", "Associations open now", registry=registry
        )


@dataclass
class Gateway:
    settings: GatewaySettings
    publisher: Publisher
    loop: asyncio.AbstractEventLoop
    metrics: GatewayMetrics
    _series: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    def _run(self, coro: Any) -> Any:
        """Run a publisher coroutine on the service's event loop from a pynetdicom thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.settings.ack_timeout_s)

    # ---- event handlers (pynetdicom threads) --------------------------------------------
    def on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a dataset we cannot even re-encode
            log.warning("C-STORE: cannot encode the received dataset (%s)", type(exc).__name__)
            self.metrics.instances.labels("failed").inc()
            return OUT_OF_RESOURCES
        try:
            published = self._run(self.publisher.publish(data))
        except (PublishError, FutureTimeout, OSError) as exc:
            log.warning(
                "C-STORE: broker did not acknowledge (%s); answering 0xA700", type(exc).__name__
            )
            self.metrics.instances.labels("failed").inc()
            return OUT_OF_RESOURCES
        if published.series_instance_uid is not None:
            with self._lock:
                per = self._series[id(event.assoc)]
                per[published.series_instance_uid] = per.get(published.series_instance_uid, 0) + 1
        self.metrics.instances.labels("stored").inc()
        return SUCCESS

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_accepted(self, event: Any) -> None:
        self.metrics.associations.labels("accepted").inc()
        self.metrics.open.inc()

    def on_rejected(self, event: Any) -> None:
        self.metrics.associations.labels("rejected").inc()

    def on_conn_open(self, event: Any) -> None:
        allowed = parse_list(self.settings.allowed_addresses)
        address = event.address[0] if event.address else ""
        if allowed and address not in allowed:
            log.warning("association from a non-allowed address refused")
            self.metrics.associations.labels("refused_address").inc()
            event.assoc.abort()

    def on_released(self, event: Any) -> None:
        self.metrics.open.dec()
        with self._lock:
            per = self._series.pop(id(event.assoc), {})
        for uid, count in per.items():
            try:
                self._run(self.publisher.end_series(uid, count))
                self.metrics.markers.inc()
            except (PublishError, FutureTimeout, OSError) as exc:
                # ingest falls back to its inactivity timeout for this series
                log.warning("end-of-series marker not acknowledged (%s)", type(exc).__name__)

    def on_aborted(self, event: Any) -> None:
        self.metrics.open.dec()
        with self._lock:
            self._series.pop(id(event.assoc), None)
        self.metrics.associations.labels("aborted").inc()

    # ---- server ---------------------------------------------------------------------------
    def build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # start() does not listen without allowed titles (pynetdicom takes an empty list as
        # "any calling AE title", and refuses a title no peer could send)
        ae.require_calling_aet = parse_list(self.settings.allowed_ae_titles)
        ae.maximum_pdu_size = 0
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.settings.tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(
            str(self.settings.tls_cert),
            str(self.settings.tls_key) if self.settings.tls_key else None,
        )
        return ctx

    def start(self) -> None:
        if not parse_list(self.settings.allowed_ae_titles):
            log.warning(
                "no calling AE titles allowed (RADSTREAM_GATEWAY__ALLOWED_AE_TITLES): "
                "the DICOM SCP does not listen"
            )
            return
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_OPEN, self.on_conn_open),
        ]
        self._server = self.build_ae().start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self.ssl_context(),
        )
        log.info(
            "gateway: %s listening on %s:%d",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

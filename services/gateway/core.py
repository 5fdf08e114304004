"""DICOM C-STORE gateway: modalities that speak DIMSE hand instances to Kafka through it.

* C-STORE success (0x0000) is answered only after the broker acknowledged the instance, so
  nothing a modality was told is stored can be lost; otherwise 0xA700 (out of resources),
  and the modality retries.
* On association release, one end-of-series marker per series seen in the association, with
  the count of instances stored. An aborted association sends no marker: ingest completes
  those series on its inactivity timeout.
* Only configured calling AE titles are accepted (rejected at association time), only from
  allowed addresses (IPs or networks); C-ECHO answers.
* DICOM TLS with client certificates (mutual TLS) is required: without ``tls_cert`` (and
  ``tls_ca``, unless ``require_client_cert`` is off) the gateway refuses to start, unless
  ``plain_dicom`` is set (the local demo only).
* What a peer may cost is capped (:mod:`services.gateway.limits`): each PDU's length and each
  dataset's size are judged from the PDU headers before a body is read (past them the
  association is aborted), associations per minute and C-STOREs per second per peer address
  (past them: refused at connection / answered 0xA700, the modality retries later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.gateway.limits import HEADER, AddressList, PduBudget, PeerLimiter
from shared.config import GatewaySettings
from shared.ingress.publisher import Publisher, PublishError
from shared.schemas import AuditEvent

log = logging.getLogger("radstream.gateway")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class GatewayConfigError(ValueError):
    """The gateway's settings leave DICOM unprotected outside the local demo."""


def check_settings(settings: GatewaySettings) -> None:
    """Refuse settings that would accept unauthenticated DICOM outside the local demo (a
    gateway without allowed AE titles does not listen for DIMSE at all: nothing to check)."""
    if settings.plain_dicom or not parse_list(settings.allowed_ae_titles):
        return
    if settings.tls_cert is None:
        raise GatewayConfigError(
            "DICOM TLS is required: set RADSTREAM_GATEWAY__TLS_CERT/TLS_KEY (and TLS_CA for "
            "client certificates); RADSTREAM_GATEWAY__PLAIN_DICOM=true is for the local demo"
        )
    if settings.require_client_cert and settings.tls_ca is None:
        raise GatewayConfigError(
            "mutual TLS is required: set RADSTREAM_GATEWAY__TLS_CA to the CA that signs the "
            "modalities' certificates (or REQUIRE_CLIENT_CERT=false to accept any peer)"
        )


class DeferredHandshake(ssl.SSLContext):
    """A server context whose TLS handshake happens on the association's first read, in the
    association's own thread. pynetdicom wraps an accepted socket in its accept loop, where
    the default handshake-on-connect let one peer that connects and sends nothing stop the
    gateway from accepting anybody else."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def guard_socket(sock: Any, budget: PduBudget) -> None:
    """Judge every PDU header ``sock`` reads before its body is read. pynetdicom's DUL reads a
    PDU as ``recv(6)`` (type, length) then ``recv(length)``; a :class:`BudgetExceeded` (an
    OSError) from the header read makes it close the transport (Evt17) without reading on."""
    original = sock.recv
    state = {"header": True}

    def recv(nr_bytes: int) -> bytearray:
        data: bytearray = original(nr_bytes)
        if state["header"] and nr_bytes == HEADER:
            state["header"] = False
            budget.header(data)
        else:
            state["header"] = True
        return data

    sock.recv = recv


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
    clock: Any = None  # () -> seconds; time.monotonic unless a test passes one
    _series: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    _budgets: dict[int, PduBudget] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None
    audit_topic: str | None = None  # its audit intake (every association is audited)

    def __post_init__(self) -> None:
        check_settings(self.settings)
        s = self.settings
        self.addresses = AddressList(s.allowed_addresses)
        self.limiter = PeerLimiter(s.peer_associations_per_minute, s.peer_instances_per_second)
        if self.clock is None:
            self.clock = time.monotonic

    @staticmethod
    def _peer(event: Any) -> str:
        try:
            return str(event.assoc.requestor.address)
        except AttributeError:
            return ""

    def _run(self, coro: Any) -> Any:
        """Run a publisher coroutine on the service's event loop from a pynetdicom thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.settings.ack_timeout_s)

    def _audit(
        self, action: str, event: Any, outcome: Literal["success", "denied", "error"] = "success"
    ) -> None:
        """An association event on the audit trail, without holding up the association (the
        calling AE title is the resource: a device name, not PHI). A failed write is logged."""
        if self.audit_topic is None:
            return
        assoc = getattr(event, "assoc", None)
        requestor = getattr(assoc, "requestor", None)
        title = str(getattr(requestor, "ae_title", "") or "").strip() or "-"
        record = AuditEvent(
            actor="gateway", action=action, resource=f"ae:{title}"[:256], outcome=outcome
        )
        fut = asyncio.run_coroutine_threadsafe(
            self.publisher.emit(self.audit_topic, b"association", record), self.loop
        )

        def done(f: Any) -> None:
            if f.exception() is not None:
                log.error("association audit event not written: %s", type(f.exception()).__name__)

        fut.add_done_callback(done)

    # ---- event handlers (pynetdicom threads) --------------------------------------------
    def on_store(self, event: Any) -> int:
        with self._lock:
            budget = self._budgets.get(id(event.assoc))
        if budget is not None:
            budget.stored()
        if not self.limiter.instance(self._peer(event), self.clock()):
            log.warning("C-STORE: peer past its instance rate; answering 0xA700")
            self.metrics.instances.labels("rate_limited").inc()
            return OUT_OF_RESOURCES
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
        with self._lock:
            budget = self._budgets.get(id(event.assoc))
        if budget is not None:
            budget.stored()
        return SUCCESS

    def on_accepted(self, event: Any) -> None:
        self.metrics.associations.labels("accepted").inc()
        self.metrics.open.inc()
        self._audit("association:accepted", event)

    def on_rejected(self, event: Any) -> None:
        self.metrics.associations.labels("rejected").inc()
        self._audit("association:rejected", event, "denied")

    def on_conn_open(self, event: Any) -> None:
        """Refusals happen here, before the association reads anything: the guarded socket
        fails its first read, so pynetdicom closes the transport in its own state machine
        (an ``abort()`` this early raised in its reactor thread)."""
        address = str(event.address[0]) if event.address else ""
        budget = PduBudget(self.settings.max_pdu_bytes + 64, self.settings.max_dataset_bytes)
        if not self.addresses.allows(address):
            log.warning("association from a non-allowed address refused")
            self.metrics.associations.labels("refused_address").inc()
            budget.refuse("refused_address")
        elif not self.limiter.association(address, self.clock()):
            log.warning("association refused: the peer is past its association rate")
            self.metrics.associations.labels("rate_limited").inc()
            budget.refuse("rate_limited")
        with self._lock:
            self._budgets[id(event.assoc)] = budget
        guard_socket(event.assoc.dul.socket, budget)
        if budget.refused is not None:
            with contextlib.suppress(OSError):  # the peer sees the refusal at once
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    def on_conn_close(self, event: Any) -> None:
        with self._lock:
            budget = self._budgets.pop(id(event.assoc), None)
        if budget is not None and budget.exceeded:
            log.warning("association ended: the peer sent more than allowed (%s)", budget.exceeded)
            self.metrics.associations.labels(budget.exceeded).inc()

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
        self._audit("association:released", event)

    def on_aborted(self, event: Any) -> None:
        self.metrics.open.dec()
        with self._lock:
            self._series.pop(id(event.assoc), None)
        self.metrics.associations.labels("aborted").inc()
        self._audit("association:aborted", event, "error")

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
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        return ae

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.settings.tls_cert is None:
            return None
        ctx = DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(
            str(self.settings.tls_cert),
            str(self.settings.tls_key) if self.settings.tls_key else None,
        )
        if self.settings.tls_ca is not None:
            ctx.load_verify_locations(cafile=str(self.settings.tls_ca))
        if self.settings.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no association
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
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
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

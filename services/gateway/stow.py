"""DICOMweb STOW-RS ingest: ``POST /dicom-web/studies[/{study}]`` over HTTPS → ``instances``.

The same path to Kafka as C-STORE: the gateway's one :class:`Publisher` (idempotent producer,
``acks=all``) publishes every accepted instance, and the response is sent only after the
broker acknowledged each one (PS3.18 §10.5: 200 all stored, 202 some, 409 none).

* **Who:** every request is authenticated before its body is read: a bearer token whose
  SHA-256 is configured for a sender, and/or a client certificate (mutual TLS) whose subject
  CN is configured for it (a sender configured with both needs both). Anything else is 401
  and nothing is read or published. Each sender has a request-rate cap (token bucket, 429).
* **How much:** the body is streamed part by part; a request over ``max_request_bytes`` is
  413 (by Content-Length before reading, or as soon as the stream passes it); a part over
  ``max_part_bytes`` (or the Kafka message cap) is refused as ``too_large``.
* **Bad parts** are judged with the same checks ingest applies (:func:`inspect_instance`),
  answered per instance in FailedSOPSequence, and dead-lettered by the gateway with the
  reason code (stage ``gateway``, source ``stow-rs``, offset = the part's index in the
  request), never with a UID or a value from the file.
* No end-of-series marker is sent: a sender may split a series over several requests
  (Orthanc sends at most ``StowMaxInstances`` per request), so ingest completes STOW-RS series
  on its inactivity timeout.

:class:`StowCore` holds the decisions (pure but for the publisher it is given);
:class:`StowServer` is the aiohttp adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pydicom
from aiohttp import MultipartReader, web
from prometheus_client import CollectorRegistry, Counter

from shared.config import StowSender, StowSettings
from shared.dicom.safe import InvalidInstance, Limits, inspect_instance
from shared.dicomweb.stow import (
    MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    PartResult,
    failure_reason,
    is_stow_content_type,
    parse_media_type,
    response_dataset,
    response_status,
)
from shared.ingress.publisher import Publisher, PublishError
from shared.metrics.stage import deadletter_counter
from shared.schemas import AuditEvent, DeadLetter
from shared.schemas.reasons import Reason

log = logging.getLogger("radstream.gateway.stow")

SOURCE = "stow-rs"  # the dead letters' source_topic: the part came over HTTP, not a topic
READ_CHUNK = 256 * 1024


class StowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "radstream_stow_requests",
            "STOW-RS requests by HTTP status",
            ["status"],
            registry=registry,
        )
        self.instances = Counter(
            "radstream_stow_instances",
            "STOW-RS instances by outcome (stored, or the dead-letter reason)",
            ["outcome"],
            registry=registry,
        )
        # the stages' dead-letter counter (same name and labels): the RadStreamDeadLetters
        # alert and the dashboard see the gateway's refused parts beside the stages' ones
        self.deadletters = deadletter_counter(registry)


# ---- pure decisions -------------------------------------------------------------------------
def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(
    senders: list[StowSender], token: str | None, client_cn: str | None
) -> StowSender | None:
    """The sender these credentials prove, or None. The token is compared by its hash in
    constant time; a sender with both a token and a certificate CN needs both."""
    digest = token_hash(token) if token is not None else None
    for sender in senders:
        if sender.token_sha256 is None and sender.client_cn is None:
            continue  # a sender without credentials can never authenticate
        token_ok = sender.token_sha256 is None or (
            digest is not None and hmac.compare_digest(digest, sender.token_sha256)
        )
        cn_ok = sender.client_cn is None or (
            client_cn is not None and hmac.compare_digest(client_cn, sender.client_cn)
        )
        if token_ok and cn_ok:
            return sender
    return None


@dataclass
class RateLimiter:
    """A token bucket per sender: ``rate_per_s`` sustained, ``burst`` at once."""

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, at

    def take(self, sender: StowSender) -> float:
        """0.0 if the request may go now (a token is taken), else seconds until it may."""
        now = self.clock()
        tokens, at = self._buckets.get(sender.name, (float(sender.burst), now))
        tokens = min(float(sender.burst), tokens + (now - at) * sender.rate_per_s)
        if tokens >= 1.0:
            self._buckets[sender.name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[sender.name] = (tokens, now)
        return (1.0 - tokens) / sender.rate_per_s


def sop_uids(data: bytes) -> tuple[str, str]:
    """Best effort (SOPClassUID, SOPInstanceUID) of a part, for its FailedSOPSequence item;
    empty strings where it cannot be read."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - an unreadable part is reported without UIDs
        return "", ""


@dataclass(frozen=True)
class Judged:
    """One part after the checks: ``refused`` None means it goes to Kafka."""

    index: int
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    refused: Reason | None = None  # the dead-letter reason
    message: str = ""


def judge(index: int, data: bytes, media_type: str, study: str | None, limits: Limits) -> Judged:
    """The gateway's verdict on one part: the checks ingest applies, plus the part's media
    type and, for ``/studies/{study}``, the study it names."""
    if media_type != MEDIA_TYPE:
        cls, uid = sop_uids(data) if data else ("", "")
        return Judged(
            index, data, cls, uid, Reason.UNSUPPORTED_MEDIA_TYPE, "the part is not " + MEDIA_TYPE
        )
    try:
        info = inspect_instance(data, limits)
    except InvalidInstance as exc:
        cls, uid = sop_uids(data) if exc.reason != Reason.TOO_LARGE else ("", "")
        return Judged(index, data, cls, uid, Reason(exc.reason), exc.message)
    if study is not None and info.study_instance_uid != study:
        return Judged(
            index,
            data,
            info.sop_class_uid,
            info.sop_instance_uid,
            Reason.STUDY_MISMATCH,
            "the instance names another study than the request URL",
        )
    return Judged(index, data, info.sop_class_uid, info.sop_instance_uid)


# ---- the core: judged parts → Kafka → results ------------------------------------------------
@dataclass
class StowCore:
    settings: StowSettings
    publisher: Publisher
    deadletter_topic: str
    audit_topic: str
    max_message_bytes: int
    metrics: StowMetrics
    rate: RateLimiter = field(default_factory=RateLimiter)

    @property
    def part_cap(self) -> int:
        # the instance travels inside an encrypted record: leave room for the envelope
        return min(self.settings.max_part_bytes, self.max_message_bytes - 64 * 1024)

    @property
    def limits(self) -> Limits:
        return Limits(max_bytes=self.part_cap, max_sequence_depth=self.settings.max_sequence_depth)

    async def one(self, part: Judged) -> PartResult:
        """Publish a good part (returns once the broker acknowledged it) or dead-letter a
        bad one; its result for the response."""
        if part.refused is not None:
            await self._dead_letter(part, part.refused)
            self.metrics.instances.labels(part.refused.value).inc()
            return PartResult(
                part.sop_class_uid, part.sop_instance_uid, failure_reason(part.refused)
            )
        try:
            await self.publisher.publish(part.data)
        except PublishError as exc:
            log.warning("STOW-RS: broker did not acknowledge (%s)", type(exc).__name__)
            self.metrics.instances.labels("not_acknowledged").inc()
            return PartResult(part.sop_class_uid, part.sop_instance_uid, failure_reason(None))
        self.metrics.instances.labels("stored").inc()
        return PartResult(part.sop_class_uid, part.sop_instance_uid)

    async def _dead_letter(self, part: Judged, reason: Reason) -> None:
        letter = DeadLetter(
            stage="gateway",
            reason=reason,
            message=f"STOW-RS part {part.index}: {part.message}"[:2000],
            source_topic=SOURCE,
            source_partition=0,
            source_offset=part.index,
            attempts=1,
        )
        key = self.publisher.keyring.keyed_hash("bytes:" + hashlib.sha256(part.data).hexdigest())
        try:
            await self.publisher.emit(self.deadletter_topic, key, letter)
        except PublishError as exc:  # the response still reports the part as failed
            log.warning("STOW-RS: dead letter not acknowledged (%s)", type(exc).__name__)
            return
        self.metrics.deadletters.labels("gateway", reason.value).inc()

    async def audit(
        self, actor: str, action: str, outcome: Literal["success", "denied", "error"]
    ) -> None:
        event = AuditEvent(actor=actor[:64], action=action, resource="instances", outcome=outcome)
        try:
            await self.publisher.emit(self.audit_topic, actor.encode()[:64], event)
        except PublishError as exc:
            log.warning("STOW-RS: audit event not acknowledged (%s)", type(exc).__name__)


# ---- the HTTP adapter -----------------------------------------------------------------------
class TooLarge(Exception):
    """The request body passed ``max_request_bytes``."""


MAX_BOUNDARY = 200
# refused requests are counted in metrics; at most this many a second become audit events
DENIALS = StowSender(name="_denied", rate_per_s=1.0, burst=10)


class StowReader(MultipartReader):
    """aiohttp's streaming multipart reader, taking boundaries longer than RFC 2046's 70
    characters: Orthanc's DICOMweb client (orthanc-dicomweb 1.7) sends 73."""

    def _get_boundary(self) -> str:
        boundary = str(self._mimetype.parameters["boundary"])
        if len(boundary) > MAX_BOUNDARY:
            raise ValueError(f"multipart boundary longer than {MAX_BOUNDARY} characters")
        return boundary


def _peer_cn(request: web.Request) -> str | None:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def _problem(status: int, text: str, **headers: str) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers or None)


@dataclass
class StowServer:
    core: StowCore
    _runner: web.AppRunner | None = None
    _window: asyncio.Semaphore | None = None  # parts held at once, across requests
    port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.core.settings.max_request_bytes)
        app.router.add_post("/dicom-web/studies", self.handle)
        app.router.add_post("/dicom-web/studies/{study}", self.handle)
        return app

    def ssl_context(self) -> ssl.SSLContext:
        s = self.core.settings
        if s.tls_cert is None:
            raise ValueError("STOW-RS needs RADSTREAM_GATEWAY__STOW__TLS_CERT (HTTPS only)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key) if s.tls_key else None)
        if s.client_ca is not None:
            ctx.load_verify_locations(str(s.client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL  # a certificate, if sent, must verify
        return ctx

    async def start(self) -> None:
        s = self.core.settings
        if not s.senders:
            log.warning("STOW-RS: no senders configured: every request is refused (401)")
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port, ssl_context=self.ssl_context())
        await site.start()
        server = site._server  # the bound socket tells the port when 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else s.port
        log.info("gateway: STOW-RS listening on https://%s:%s/dicom-web/studies", s.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _answer(self, response: web.Response) -> web.Response:
        self.core.metrics.requests.labels(str(response.status)).inc()
        return response

    async def handle(self, request: web.Request) -> web.Response:
        s = self.core.settings
        sender = authenticate(
            s.senders, bearer(request.headers.get("Authorization")), _peer_cn(request)
        )
        if sender is None:
            if self.core.rate.take(DENIALS) == 0.0:  # audit refusals, but not a flood of them
                await self.core.audit("unknown", "stow", "denied")
            return self._answer(
                _problem(401, "authentication required", **{"WWW-Authenticate": "Bearer"})
            )
        wait = self.core.rate.take(sender)
        if wait > 0:
            return self._answer(
                _problem(429, "rate cap reached", **{"Retry-After": str(max(1, round(wait)))})
            )
        if not is_stow_content_type(request.headers.get("Content-Type", "")):
            return self._answer(_problem(415, f'expected multipart/related; type="{MEDIA_TYPE}"'))
        if (request.content_length or 0) > s.max_request_bytes:
            return self._answer(_problem(413, "request larger than the cap"))
        study = request.match_info.get("study")
        try:
            results = await self._store(request, study)
        except TooLarge:
            return self._answer(_problem(413, "request larger than the cap"))
        except ValueError as exc:  # aiohttp: a malformed multipart body
            log.warning("STOW-RS: malformed multipart body (%s)", type(exc).__name__)
            return self._answer(_problem(400, "malformed multipart body"))
        if not results:
            return self._answer(_problem(400, "no instances in the request"))
        stored = sum(r.stored for r in results)
        await self.core.audit(sender.name, "stow", "error" if stored < len(results) else "success")
        return self._answer(
            web.Response(  # bytes, so no "; charset=" that clients comparing the type refuse
                body=json.dumps(response_dataset(results)).encode(),
                status=response_status(results),
                content_type=RESPONSE_MEDIA_TYPE,
            )
        )

    async def _store(self, request: web.Request, study: str | None) -> list[PartResult]:
        """Read, judge and publish part by part: at most ``window`` parts are held (read and
        not yet acknowledged) at once by all requests together, so the endpoint's memory is
        bounded by the window times the part cap, not by the request cap or the number of
        senders. On TooLarge or a malformed body the parts already sent are awaited (they
        stay published) before the error goes up."""
        if self._window is None:  # made on the serving loop
            self._window = asyncio.Semaphore(self.core.settings.window)
        window = self._window
        limits = self.core.limits
        tasks: list[asyncio.Task[PartResult]] = []

        async def one(part: Judged) -> PartResult:
            try:
                return await self.core.one(part)
            finally:
                window.release()

        try:
            index = 0
            async for kind, data in self._parts(request):
                await window.acquire()
                part = await asyncio.to_thread(judge, index, data, kind, study, limits)
                tasks.append(asyncio.create_task(one(part)))
                index += 1
        finally:
            results = list(await asyncio.gather(*tasks))
        return results

    async def _parts(self, request: web.Request) -> AsyncIterator[tuple[str, bytes]]:
        """Each part's media type and bytes; a part over the cap keeps only cap+1 bytes (it is
        refused as too large); TooLarge once the body passes the request cap."""
        s = self.core.settings
        cap = self.core.part_cap
        total = count = 0
        reader = StowReader(
            request.headers,
            request.content,
            client_max_size=s.max_request_bytes,
            max_size_error_cls=TooLarge,
        )
        while True:
            part: Any = await reader.next()
            if part is None:
                return
            count += 1
            if count > s.max_parts:
                raise TooLarge
            kind, _ = parse_media_type(part.headers.get("Content-Type", ""))
            if not hasattr(part, "read_chunk"):  # a nested multipart: not an instance
                await part.release()
                yield kind or "multipart", b""
                continue
            buf = bytearray()
            while True:
                chunk = await part.read_chunk(READ_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > s.max_request_bytes:
                    raise TooLarge
                if len(buf) <= cap:
                    buf += chunk[: cap + 1 - len(buf)]
            yield kind, bytes(buf)

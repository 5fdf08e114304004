"""The worklist's Kafka side: follows alerts, results and acknowledgements (all partitions,
committed records only, from ``lookback_s`` ago) into the :class:`Worklist`, and writes
acknowledgements (keyed like their alert) with their audit event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import TypeAdapter

from services.worklist.core import Entry, Worklist
from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError
from shared.schemas import Alert, AlertAck, AuditEvent, BlobRef, ResultsReady
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs
from shared.storage import BlobStore

log = logging.getLogger("radstream.worklist")
PRINCIPAL = "worklist"
Outcome = Literal["success", "denied", "error"]


def actor(user: str | None) -> str:
    """Who did it, as the audit trail names them: the service and its signed-in user."""
    return PRINCIPAL if user is None else f"{PRINCIPAL}:{user}"[:64]


def _log_failure(delivery: asyncio.Future[Any]) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        log.error("an audit event was not delivered: %s", type(delivery.exception()).__name__)


MODELS: dict[str, Any] = {"alerts": Alert, "results": ResultsReady, "acks": AlertAck}


class Feed:
    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        store: BlobStore,
        worklist: Worklist,
        changed: Callable[[str], None] = lambda alert_id: None,
    ) -> None:
        self.settings = settings
        self.codec = Codec(keyring)
        self.store = store
        self.worklist = worklist
        self.changed = changed
        self.ready = False  # caught up with what was on the topics at start
        self.skipped = 0  # records that could not be read (poison): counted, never shown
        self._adapters = {settings.topic(t): TypeAdapter(m) for t, m in MODELS.items()}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        kafka = self.settings.kafka
        self._consumer = AIOKafkaConsumer(
            isolation_level="read_committed",
            enable_auto_commit=False,
            max_partition_fetch_bytes=kafka.max_message_bytes,
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
            fetch_min_bytes=self.settings.fetch_min_bytes,
            **client_kwargs(kafka),
        )
        self._producer = AIOKafkaProducer(enable_idempotence=True, **client_kwargs(kafka))
        await self._consumer.start()
        await self._producer.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _positions(self) -> tuple[list[TopicPartition], dict[TopicPartition, int]]:
        consumer = self._consumer
        assert consumer is not None
        tps: list[TopicPartition] = []
        for topic in self._adapters:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client._wait_on_metadata(topic)
                parts = consumer.partitions_for_topic(topic) or set()
            tps.extend(TopicPartition(topic, p) for p in sorted(parts))
        since_ms = int((time.time() - self.settings.worklist.lookback_s) * 1000)
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        ends = await consumer.end_offsets(tps)
        starts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        # assign + seek with no await between (the fetcher's own reset would race a seek)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        return tps, ends

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        tps, ends = await self._positions()
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for recs in batches.values():
                for rec in recs:
                    self._apply(rec)
            if not self.ready:
                positions = {tp: await consumer.position(tp) for tp in tps}
                self.ready = all(positions[tp] >= ends[tp] for tp in tps)
                if self.ready:
                    log.info("worklist caught up: %d alerts listed", len(self.worklist.newest()))

    def _apply(self, rec: Any) -> None:
        adapter = self._adapters[rec.topic]
        try:
            record = self.codec.decode(rec.topic, rec.key, rec.value, rec.headers, adapter)
        except PoisonError as exc:
            self.skipped += 1
            log.warning(
                "unreadable record skipped: topic=%s partition=%d offset=%d reason=%s",
                rec.topic,
                rec.partition,
                rec.offset,
                exc.reason,
            )
            return
        if isinstance(record, Alert):
            entry = self.worklist.add_alert(record, rec.key)
            if entry is not None:
                self.changed(record.alert_id)
        elif isinstance(record, ResultsReady):
            for joined in self.worklist.add_results(record):
                self.changed(joined.alert.alert_id)
        elif isinstance(record, AlertAck):
            acked = self.worklist.add_ack(record)
            if acked is not None:
                self.changed(record.alert_id)

    async def acknowledge(self, entry: Entry, ack: AlertAck) -> None:
        producer = self._producer
        assert producer is not None
        topic = self.settings.topic("acks")
        value, headers = self.codec.encode(topic, entry.key, ack)
        await producer.send_and_wait(topic, value, key=entry.key, headers=headers)
        event = AuditEvent(
            actor=actor(ack.user),
            action=f"alert_acknowledged_by_{ack.role}",
            resource=f"alert:{ack.alert_id}",  # a uuid5 of the series: no UID in clear
            outcome="success",
        )
        await (await self._send_audit(event, entry.key))

    async def audit(
        self, user: str | None, action: str, resource: str, outcome: Outcome, key: bytes | None
    ) -> None:
        """Queue an audit event (sign-ins, identities shown); its delivery is not waited for,
        a failure is logged (without the event)."""
        event = AuditEvent(
            actor=actor(user),
            action=action,
            resource=resource,
            outcome=outcome,
        )
        delivery = await self._send_audit(event, key)
        delivery.add_done_callback(_log_failure)

    async def _send_audit(self, event: AuditEvent, key: bytes | None) -> asyncio.Future[Any]:
        producer = self._producer
        assert producer is not None
        topic = self.settings.audit_topic()  # its own intake topic
        value, headers = self.codec.encode(topic, key, event)
        future: asyncio.Future[Any] = await producer.send(topic, value, key=key, headers=headers)
        return future

    def blob(self, ref: BlobRef) -> bytes:
        return self.store.get(ref)

"""The audit sequencer's adapter: every principal's intake topic → the hash-chained ``audit``.

One consume → chain → produce loop in Kafka transactions that also commit the intake offsets
(exactly once: an event is chained once, a crash re-chains nothing twice). The chain head is
the last committed entry of ``audit`` (one partition), read after the producer has fenced any
older instance, so two sequencers never fork the chain. The pure part is
:mod:`shared.security.audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry, Counter
from pydantic import TypeAdapter

from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError
from shared.schemas import AuditEntry, AuditEvent
from shared.security.audit import Chain, principal_of
from shared.security.envelope import EnvelopeError, Keyring
from shared.security.kafka import client_kwargs
from shared.stack.principals import INTAKES, SEQUENCER
from shared.topology import AUDIT

log = logging.getLogger("radstream.auditlog")
KEY = b"audit"  # one chain, one partition, one key
_EVENT: TypeAdapter[AuditEvent] = TypeAdapter(AuditEvent)
_ENTRY: TypeAdapter[AuditEntry] = TypeAdapter(AuditEntry)


async def last_entry(
    consumer: AIOKafkaConsumer, tp: TopicPartition, codec: Codec
) -> AuditEntry | None:
    """The last committed entry of the chain (``consumer`` reads committed, is assigned ``tp``);
    steps back further while only transaction markers are found."""
    end = (await consumer.end_offsets([tp]))[tp]
    begin = (await consumer.beginning_offsets([tp]))[tp]
    window = 64
    while True:
        start = max(begin, end - window)
        consumer.seek(tp, start)
        last = None
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for rec in batch.get(tp, []):
                last = codec.decode(rec.topic, rec.key, rec.value, rec.headers, _ENTRY)
        if last is not None or start == begin:
            return last
        window *= 4


@dataclass
class Sequencer:
    settings: Settings
    keyring: Keyring
    registry: CollectorRegistry
    chained: Counter = field(init=False)
    ready: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.chained = Counter(
            "radstream_audit_chained_total",
            "audit events appended to the hash chain, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "radstream_audit_sequencer_restarts",
            "times the sequencer started over after a Kafka error (nothing half-chained)",
            registry=self.registry,
        )
        self.codec = Codec(self.keyring)
        self.audit = self.settings.topic(AUDIT)
        self.intakes = [self.settings.topic(t) for t in INTAKES]
        self.group = self.settings.topic(SEQUENCER)

    def entry_for(self, chain: Chain, rec: ConsumerRecord[bytes, bytes]) -> AuditEntry:
        principal = principal_of(rec.topic)
        source = f"{rec.topic}/{rec.partition}/{rec.offset}"
        try:
            event = self.codec.decode(rec.topic, rec.key, rec.value, rec.headers, _EVENT)
        except (PoisonError, EnvelopeError) as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            log.warning("audit: unreadable event from %s (%s), chained as such", principal, reason)
            return chain.append_unreadable(principal, source, str(reason))
        return chain.append(event, principal, source)

    async def run_until_stopped(
        self, stop: asyncio.Event, backoff_s: float = 1.0, max_backoff_s: float = 30.0
    ) -> None:
        """:meth:`run`, started over after a Kafka error (a failed transaction committed
        nothing: the new run re-reads the head and the uncommitted intake records), with a
        growing pause, until ``stop`` is set."""
        delay = backoff_s
        while not stop.is_set():
            try:
                await self.run(stop)
                return
            except KafkaError as exc:
                self.restarts.inc()
                log.warning("audit: sequencer starting over after %s", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, max_backoff_s)

    async def run(self, stop: asyncio.Event) -> None:
        kafka = self.settings.kafka
        producer = AIOKafkaProducer(
            transactional_id=f"{self.group}.0", acks="all", **client_kwargs(kafka)
        )
        head_reader = AIOKafkaConsumer(
            isolation_level="read_committed", enable_auto_commit=False, **client_kwargs(kafka)
        )
        consumer = AIOKafkaConsumer(
            *self.intakes,
            group_id=self.group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **client_kwargs(kafka),
        )
        await producer.start()  # init_transactions: fences an older sequencer first
        await head_reader.start()
        try:
            tp = TopicPartition(self.audit, 0)
            head_reader.assign([tp])
            chain = Chain.after(await last_entry(head_reader, tp, self.codec))
        finally:
            await head_reader.stop()
        await consumer.start()
        self.ready = True
        log.info("audit: chaining from seq %d", chain.seq)
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                if not batches:
                    continue
                # a failed transaction ends the process (nothing of the batch is committed);
                # the restart re-reads the head and the uncommitted intake records
                async with producer.transaction():
                    offsets = {}
                    for part, records in batches.items():
                        for rec in records:
                            entry = self.entry_for(chain, rec)
                            value, headers = self.codec.encode(self.audit, KEY, entry)
                            await producer.send(
                                self.audit, value, key=KEY, headers=headers, partition=0
                            )
                            self.chained.labels(entry.outcome).inc()
                        offsets[part] = records[-1].offset + 1
                    await producer.send_offsets_to_transaction(offsets, self.group)
        finally:
            self.ready = False
            await consumer.stop()
            await producer.stop()

"""Partition ownership: who may process an input partition, from where, with what state.

Exactly once on aiokafka's (pre-KIP-447) transaction protocol rests on these rules:

* one transactional producer per *input partition*, ``transactional.id = <group>.<partition>``.
  Whoever owns partition *p* uses the same id, so the new owner's ``init_transactions``
  (``producer.start()``) fences any zombie that still processes *p* and aborts its open
  transaction (or completes one whose commit was already requested);
* only then is the committed offset of *p* read and the consumer sought to it; the partition
  stays paused until then, so nothing is fetched from a stale position;
* a stateful stage restores the partition's state from its compacted changelog (read
  committed) before the first record is handled; a value sealed under a rotated-out key is
  written again, sealed with the active key, with the partition's next transaction;
* revocation waits for the partition's in-flight transaction before giving it up;
* a rolled-back transaction discards pending state and seeks back to the last committed
  offset; one whose commit outcome is unknown is re-acquired from scratch (new producer,
  committed offset, state restored); a fenced one is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from shared.config import KafkaSettings, Settings
from shared.metrics import StageMetrics
from shared.runtime.state import PartitionState, changelog_aad
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs

log = logging.getLogger("radstream.runtime")


@dataclass
class OwnedPartition:
    """An input partition this instance owns, with its producer and state."""

    tp: TopicPartition
    producer: AIOKafkaProducer
    state: PartitionState
    next_offset: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    last_tick: float = field(default_factory=time.monotonic)


class Ownership:
    """The partitions one stage instance owns; driven by the consumer group's rebalances."""

    def __init__(
        self,
        *,
        stage: str,
        settings: Settings,
        keyring: Keyring,
        metrics: StageMetrics,
        consumer: AIOKafkaConsumer,
        restorer: AIOKafkaConsumer | None,
        on_assigned: Callable[[], None],
    ) -> None:
        self.stage = stage
        self.settings = settings
        self.keyring = keyring
        self.metrics = metrics
        self.group = settings.topic(stage)
        self.changelog = settings.topic(f"{stage}.state")
        self._consumer = consumer
        self._restorer = restorer  # None: a stateless stage
        self._on_assigned = on_assigned
        self._parts: dict[TopicPartition, OwnedPartition] = {}

    def get(self, tp: TopicPartition) -> OwnedPartition | None:
        return self._parts.get(tp)

    def owned(self) -> list[OwnedPartition]:
        return list(self._parts.values())

    def listener(self) -> ConsumerRebalanceListener:
        return _Listener(self)

    def producer_for(self, partition: int) -> AIOKafkaProducer:
        """The transactional producer of one input partition: whoever owns the partition uses
        this id, so the new owner's InitProducerId fences any zombie of the old one."""
        return AIOKafkaProducer(
            transactional_id=f"{self.group}.{partition}",
            enable_idempotence=True,
            acks="all",
            linger_ms=self.settings.producer_linger_ms,
            retry_backoff_ms=self.settings.producer_retry_backoff_ms,
            max_request_size=self.settings.kafka.max_message_bytes,
            max_batch_size=1024 * 1024,
            request_timeout_ms=30000,
            **client_kwargs(self.settings.kafka),
        )

    # ---- rebalance ------------------------------------------------------------------------
    async def assigned(self, assigned: set[TopicPartition]) -> None:
        fresh = sorted(tp for tp in assigned if tp not in self._parts)
        # Nothing may be fetched for a partition before its producer has fenced the previous
        # owner and we have sought to the committed offset read after that.
        self._consumer.pause(*fresh)
        for tp in fresh:
            producer = self.producer_for(tp.partition)
            await producer.start()  # InitProducerId: fences a zombie, ends its transaction
            state = PartitionState()
            next_offset = await self._seek_committed(tp)
            if self._restorer is not None:
                await self._restore(tp.partition, state)
            self._parts[tp] = OwnedPartition(tp, producer, state, next_offset)
            log.info(
                "stage %s: assigned partition %d at offset %d",
                self.stage,
                tp.partition,
                next_offset,
            )
        self._consumer.resume(*fresh)
        self.metrics.assigned.labels(self.stage).set(len(self._parts))
        self.metrics.rebalances.labels(self.stage, "assigned").inc()
        self._on_assigned()

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.metrics.rebalances.labels(self.stage, "revoked").inc()
        for tp in revoked:
            part = self._parts.get(tp)
            if part is None:
                continue
            async with part.lock:  # let the in-flight transaction finish
                part.closed = True
                await part.producer.stop()
            self._parts.pop(tp, None)
            self.metrics.lag.remove(self.stage, str(tp.partition))
            log.info("stage %s: revoked partition %d", self.stage, tp.partition)
        self.metrics.assigned.labels(self.stage).set(len(self._parts))

    async def close(self) -> None:
        """Shutdown: finish in-flight transactions, stop every producer."""
        for part in list(self._parts.values()):
            async with part.lock:
                part.closed = True
                await part.producer.stop()
        self._parts.clear()

    # ---- after a failed transaction (the caller holds ``part.lock``) ----------------------
    async def rolled_back(self, part: OwnedPartition, outcome: str, producer_usable: bool) -> None:
        """The transaction was rolled back: drop pending state, redo from the last commit."""
        part.state.abort()
        self.metrics.transactions.labels(self.stage, outcome).inc()
        if not producer_usable:
            log.warning(
                "stage %s: recreating producer of partition %d", self.stage, part.tp.partition
            )
            await self._replace_producer(part)
        if not part.closed:
            self._consumer.seek(part.tp, part.next_offset)

    async def recover(self, part: OwnedPartition) -> None:
        """The commit's outcome is unknown: re-acquire the partition as a new owner would
        (a new producer ends the transaction; then the committed offset and state decide)."""
        part.state.abort()
        self.metrics.transactions.labels(self.stage, "uncertain").inc()
        await self._replace_producer(part)
        part.next_offset = await self._seek_committed(part.tp)
        if self._restorer is not None:
            part.state = PartitionState()
            await self._restore(part.tp.partition, part.state)
        log.warning(
            "stage %s: partition %d re-acquired at offset %d after an uncertain commit",
            self.stage,
            part.tp.partition,
            part.next_offset,
        )

    async def fenced(self, part: OwnedPartition) -> None:
        """Another instance owns this partition now: drop our work and stop consuming it."""
        log.warning(
            "stage %s: producer for partition %d fenced; pausing it", self.stage, part.tp.partition
        )
        part.state.abort()
        part.closed = True
        self.metrics.transactions.labels(self.stage, "fenced").inc()
        self._consumer.pause(part.tp)
        await part.producer.stop()

    # ---- helpers --------------------------------------------------------------------------
    async def _replace_producer(self, part: OwnedPartition) -> None:
        await part.producer.stop()
        part.producer = self.producer_for(part.tp.partition)
        await part.producer.start()

    async def _seek_committed(self, tp: TopicPartition) -> int:
        committed = await self._consumer.committed(tp)
        if committed is None:
            committed = (await self._consumer.beginning_offsets([tp]))[tp]
        self._consumer.seek(tp, committed)
        return int(committed)

    async def _restore(self, partition: int, state: PartitionState) -> None:
        assert self._restorer is not None
        count = await restore_partition(
            self._restorer, self.changelog, partition, self.keyring, state
        )
        log.info(
            "stage %s: restored %d state records of partition %d", self.stage, count, partition
        )

    def update_lag(self) -> None:
        for tp, part in list(self._parts.items()):
            end = self._consumer.last_stable_offset(tp)
            if end is None:
                end = self._consumer.highwater(tp)
            if end is not None:
                self.metrics.lag.labels(self.stage, str(tp.partition)).set(
                    max(0, end - part.next_offset)
                )


def restorer(kafka: KafkaSettings) -> AIOKafkaConsumer:
    """The consumer that reads changelogs back (no group; committed records only). Its
    default reset is *earliest*: a partition it is assigned is never read from its end."""
    return AIOKafkaConsumer(
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=kafka.max_message_bytes,
        **client_kwargs(kafka),
    )


async def restore_partition(
    consumer: AIOKafkaConsumer,
    changelog: str,
    partition: int,
    keyring: Keyring,
    state: PartitionState,
) -> int:
    """Read one changelog partition from its beginning to its last stable offset into
    ``state``; returns the records read.

    The offsets are fetched *before* the partition is assigned and the position is set by
    ``seek`` right after ``assign``, with no await in between. ``seek_to_beginning`` would
    race the fetcher: ``assign`` starts a reset to the consumer's default strategy, and a
    ListOffsets(latest) answer arriving after ``seek_to_beginning`` asked for *earliest*
    is applied to it (aiokafka only checks that a reset is still awaited, not which):
    the restore then starts at the end and reads nothing. That lost ingest's series state
    (a re-sent series ran again at revision 1, the same alert raised twice) and the alert
    stage's raised ids, now and then, after a restart or a rebalance.
    """
    tp = TopicPartition(changelog, partition)
    begin = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]  # read_committed: the last stable offset
    consumer.assign([tp])
    consumer.seek(tp, begin)
    count = 0
    latest: dict[bytes, bytes | None] = {}  # only the last value of a key is opened: an
    # older one, not compacted away yet, may be sealed under a key retired since
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=500)
        for rec in batch.get(tp, []):
            latest.pop(rec.key, None)
            latest[rec.key] = rec.value
            count += 1
    for key, sealed in latest.items():
        value = None if sealed is None else keyring.open(sealed, changelog_aad(changelog, key))
        state.restore(key, value)
        if sealed is not None and not keyring.is_current(sealed):
            state.reseal(key)  # re-wrapped with the next commit after a key rotation
    return count


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ownership: Ownership) -> None:
        self._ownership = ownership

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._ownership.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._ownership.assigned(assigned)

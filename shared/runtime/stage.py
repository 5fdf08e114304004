"""A stage: input topic, output topic(s), a typed handler. The runtime does the rest.

Exactly once, on aiokafka's (pre-KIP-447) transaction protocol:

* one transactional producer per *input partition*, ``transactional.id =
  <prefix><stage>.<partition>``. Whoever owns partition *p* uses the same id, so the new owner's
  ``init_transactions`` fences any zombie that still processes *p* and aborts its open
  transaction; only then does the new owner read the committed offset of *p* and seek to it;
* consume (``read_committed``, no auto-commit) → handle → produce outputs, dead letters and
  state changes → ``send_offsets_to_transaction`` → commit, all in one transaction per batch;
* revocation waits for the partition's in-flight transaction before giving the partition up;
* any failure of the transaction aborts it, discards pending state and seeks back to the last
  committed offset, so the batch is redone, never half-applied.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, ProducerFenced
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, TypeAdapter

from shared.config import Settings
from shared.metrics import HealthServer, StageMetrics
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError, RetriableError
from shared.runtime.state import PartitionState
from shared.schemas import DeadLetter
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs

log = logging.getLogger("radstream.runtime")

In = TypeVar("In")


@dataclass(frozen=True)
class Emit:
    """An output to a topic other than the stage's default, or under another key.

    ``key`` is the identity to hash (e.g. a SeriesInstanceUID), or ``bytes`` already hashed
    (e.g. a state key); ``None`` keeps the input key.
    """

    topic: str
    record: BaseModel
    key: str | bytes | None = None


HandlerResult = BaseModel | Emit | Sequence[BaseModel | Emit] | None


@dataclass
class Context:
    """What a handler knows about the record it handles."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp_ms: int
    state: PartitionState | None
    keyring: Keyring

    def key_for(self, identity: str) -> bytes:
        return self.keyring.keyed_hash(identity)


@dataclass(frozen=True)
class StageSpec(Generic[In]):
    """What a service declares. ``input_type`` may be a model or an annotated union."""

    name: str
    input_topic: str
    input_type: Any
    output_topic: str | None
    handler: Callable[[In, Context], HandlerResult | Awaitable[HandlerResult]]
    stateful: bool = False
    tick: Callable[[Context, float], HandlerResult] | None = None
    tick_interval_s: float = 1.0


class _Stopping(Exception):
    """Raised inside a batch when shutdown interrupts a retry wait."""


@dataclass
class _Partition:
    tp: TopicPartition
    producer: AIOKafkaProducer
    state: PartitionState
    next_offset: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    last_tick: float = field(default_factory=time.monotonic)


Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


class StageRunner(Generic[In]):
    def __init__(
        self,
        spec: StageSpec[In],
        settings: Settings,
        keyring: Keyring,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.keyring = keyring
        self.codec = Codec(keyring)
        self.registry = registry or CollectorRegistry()
        self.metrics = StageMetrics(self.registry, spec.name)
        self._adapter: TypeAdapter[In] = TypeAdapter(spec.input_type)
        self._input = settings.topic(spec.input_topic)
        self._group = settings.topic(spec.name)
        self._changelog = settings.topic(f"{spec.name}.state")
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._stop = asyncio.Event()
        self._stopping = threading.Event()  # seen by handler threads (retry waits)
        self._evloop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._executor = ThreadPoolExecutor(settings.handler_threads, f"{spec.name}-handler")
        self._is_async = inspect.iscoroutinefunction(spec.handler)
        self._consumer: AIOKafkaConsumer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self.http = HealthServer(
            self.registry, settings.metrics_host, settings.metrics_port, lambda: self._ready
        )

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping.set()
        if self._evloop is not None:
            self._evloop.call_soon_threadsafe(self._stop.set)
        else:
            self._stop.set()

    @property
    def ready(self) -> bool:
        return self._ready

    async def run(self) -> None:
        self._evloop = asyncio.get_running_loop()
        kafka = self.settings.kafka
        common = client_kwargs(kafka)
        await self.http.start()
        log.info(
            "stage %s: metrics on http://%s:%d",
            self.spec.name,
            self.settings.metrics_host,
            self.http.port,
        )
        self._consumer = AIOKafkaConsumer(
            group_id=self._group,
            client_id=f"{self.spec.name}-{socket.gethostname()}-{os.getpid()}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_poll_interval_ms=int(self.settings.max_poll_interval_s * 1000),
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=max(500, int(self.settings.session_timeout_s * 1000 / 4)),
            rebalance_timeout_ms=int(self.settings.max_poll_interval_s * 1000),
            max_partition_fetch_bytes=kafka.max_message_bytes,
            fetch_max_bytes=max(kafka.max_message_bytes, 52428800),
            **common,
        )
        if self.spec.stateful:
            self._restorer = AIOKafkaConsumer(
                isolation_level="read_committed",
                enable_auto_commit=False,
                max_partition_fetch_bytes=kafka.max_message_bytes,
                **common,
            )
        try:
            if self._restorer is not None:
                await self._restorer.start()
            self._consumer.subscribe([self._input], listener=_Listener(self))
            await self._consumer.start()
            await self._main_loop()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        async def close() -> None:
            for part in list(self._partitions.values()):
                async with part.lock:
                    part.closed = True
                    await part.producer.stop()
            self._partitions.clear()
            if self._consumer is not None:
                await self._consumer.stop()  # leaves the group
            if self._restorer is not None:
                await self._restorer.stop()

        try:
            await asyncio.wait_for(close(), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning(
                "stage %s: shutdown timed out; open transactions are aborted by the broker",
                self.spec.name,
            )
        await self.http.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("stage %s: stopped", self.spec.name)

    async def _main_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stop.is_set():
            # No max_records here: aiokafka then drains one partition's buffer before the
            # next, which starves partitions. Transactions are sized in _process instead.
            batches = await consumer.getmany(timeout_ms=200)
            if batches:
                await asyncio.gather(*(self._process(tp, recs) for tp, recs in batches.items()))
            if self.spec.tick is not None:
                await self._ticks()
            self._update_lag()

    def _update_lag(self) -> None:
        assert self._consumer is not None
        for tp, part in list(self._partitions.items()):
            end = self._consumer.last_stable_offset(tp)
            if end is None:
                end = self._consumer.highwater(tp)
            if end is not None:
                self.metrics.lag.labels(self.spec.name, str(tp.partition)).set(
                    max(0, end - part.next_offset)
                )

    def _producer_for(self, partition: int) -> AIOKafkaProducer:
        """The transactional producer of one input partition: whoever owns the partition uses
        this id, so the new owner's InitProducerId fences any zombie of the old one."""
        return AIOKafkaProducer(
            transactional_id=f"{self._group}.{partition}",
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            max_request_size=self.settings.kafka.max_message_bytes,
            max_batch_size=1024 * 1024,
            request_timeout_ms=30000,
            **client_kwargs(self.settings.kafka),
        )

    # ---- rebalance ------------------------------------------------------------------------
    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        fresh = sorted(tp for tp in assigned if tp not in self._partitions)
        # Nothing may be fetched for a partition before its producer has fenced the previous
        # owner and we have sought to the committed offset read after that.
        self._consumer.pause(*fresh)
        for tp in fresh:
            producer = self._producer_for(tp.partition)
            # start() runs InitProducerId: fences a zombie owner of this partition and aborts
            # its open transaction before we read the committed offset below.
            await producer.start()
            committed = await self._consumer.committed(tp)
            if committed is None:
                committed = (await self._consumer.beginning_offsets([tp]))[tp]
            self._consumer.seek(tp, committed)
            next_offset = committed
            state = PartitionState()
            if self.spec.stateful:
                await self._restore(tp.partition, state)
            self._partitions[tp] = _Partition(tp, producer, state, next_offset)
            log.info(
                "stage %s: assigned partition %d at offset %d",
                self.spec.name,
                tp.partition,
                next_offset,
            )
        self._consumer.resume(*fresh)
        self.metrics.assigned.labels(self.spec.name).set(len(self._partitions))
        self.metrics.rebalances.labels(self.spec.name, "assigned").inc()
        self._ready = True

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.metrics.rebalances.labels(self.spec.name, "revoked").inc()
        for tp in revoked:
            part = self._partitions.get(tp)
            if part is None:
                continue
            async with part.lock:  # let the in-flight transaction finish
                part.closed = True
                await part.producer.stop()
            self._partitions.pop(tp, None)
            self.metrics.lag.remove(self.spec.name, str(tp.partition)) if self._has_lag(
                tp
            ) else None
            log.info("stage %s: revoked partition %d", self.spec.name, tp.partition)
        self.metrics.assigned.labels(self.spec.name).set(len(self._partitions))

    def _has_lag(self, tp: TopicPartition) -> bool:
        try:
            self.metrics.lag.labels(self.spec.name, str(tp.partition))
        except ValueError:
            return False
        return True

    async def _restore(self, partition: int, state: PartitionState) -> None:
        assert self._restorer is not None
        tp = TopicPartition(self._changelog, partition)
        self._restorer.assign([tp])
        end = (await self._restorer.end_offsets([tp]))[tp]
        await self._restorer.seek_to_beginning(tp)
        count = 0
        while await self._restorer.position(tp) < end:
            batch = await self._restorer.getmany(tp, timeout_ms=500)
            for rec in batch.get(tp, []):
                value = None
                if rec.value is not None:
                    value = self.keyring.open(rec.value, self._state_aad(rec.key))
                state.restore(rec.key, value)
                count += 1
        log.info(
            "stage %s: restored %d state records of partition %d", self.spec.name, count, partition
        )

    def _state_aad(self, key: bytes) -> bytes:
        return b"\x00".join((self._changelog.encode(), key, b"radstream.state", b"1"))

    # ---- processing -----------------------------------------------------------------------
    async def _process(self, tp: TopicPartition, records: list[Any]) -> None:
        part = self._partitions.get(tp)
        if part is None:
            return
        async with part.lock:
            if part.closed or self._partitions.get(tp) is not part:
                return
            records = [r for r in records if r.offset >= part.next_offset]
            chunk: list[Any] = []
            size = 0
            for rec in records:
                chunk.append(rec)
                size += len(rec.value or b"")
                if (
                    size >= self.settings.batch_max_bytes
                    or len(chunk) >= self.settings.batch_max_records
                ):
                    if not await self._transaction(part, chunk):
                        return
                    chunk, size = [], 0
            if chunk:
                await self._transaction(part, chunk)

    async def _transaction(self, part: _Partition, records: list[Any]) -> bool:
        """Handle ``records`` and commit outputs + offsets atomically. False if aborted."""
        started = time.perf_counter()
        outgoing: list[Outgoing] = []
        outcomes: list[str | None] = []  # None: ok, else dead-letter reason
        try:
            # decode, handle and encode off the event loop: heartbeats and other partitions'
            # transactions go on while a slow record is handled
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._handle_chunk, part, records)
            for outs, reason in results:
                outgoing.extend(outs)
                outcomes.append(reason)
            outgoing.extend(self._state_changes(part))
            await self._commit(part, outgoing, {part.tp: records[-1].offset + 1})
        except _Stopping:
            await self._abort(part, "stopping")
            return False
        except ProducerFenced:
            await self._fenced(part)
            return False
        except KafkaError as exc:
            log.warning(
                "stage %s: transaction on partition %d failed (%s); redoing batch",
                self.spec.name,
                part.tp.partition,
                type(exc).__name__,
            )
            await self._abort(part, "aborted")
            return False
        part.state.commit()
        part.next_offset = records[-1].offset + 1
        self.metrics.transaction_seconds.labels(self.spec.name).observe(
            time.perf_counter() - started
        )
        self.metrics.transactions.labels(self.spec.name, "committed").inc()
        self.metrics.outputs.labels(self.spec.name).inc(
            sum(1 for o in outgoing if o[0] != self._changelog)
        )
        for reason in outcomes:
            if reason is None:
                self.metrics.messages.labels(self.spec.name, "ok").inc()
            else:
                self.metrics.dead_letter(reason)
        return True

    async def _commit(
        self, part: _Partition, outgoing: list[Outgoing], offsets: dict[TopicPartition, int]
    ) -> None:
        producer = part.producer
        await producer.begin_transaction()
        try:
            futures = [
                await producer.send(
                    topic, value=value, key=key, headers=headers, partition=partition
                )
                for topic, key, value, headers, partition in outgoing
            ]
            if futures:
                await asyncio.gather(*futures)
            await producer.send_offsets_to_transaction(offsets, self._group)
        except BaseException:
            raise
        await producer.commit_transaction()

    async def _abort(self, part: _Partition, outcome: str) -> None:
        part.state.abort()
        self.metrics.transactions.labels(self.spec.name, outcome).inc()
        try:
            if (
                part.producer._txn_manager is not None
                and part.producer._txn_manager.is_in_transaction()
            ):
                await part.producer.abort_transaction()
        except KafkaError as exc:
            log.warning(
                "stage %s: abort failed (%s); recreating producer",
                self.spec.name,
                type(exc).__name__,
            )
            await self._reopen(part)
        assert self._consumer is not None
        if not part.closed:
            self._consumer.seek(part.tp, part.next_offset)

    async def _reopen(self, part: _Partition) -> None:
        old = part.producer
        await old.stop()
        part.producer = self._producer_for(part.tp.partition)
        await part.producer.start()

    async def _fenced(self, part: _Partition) -> None:
        """Another instance owns this partition now: drop our work and stop consuming it."""
        log.warning(
            "stage %s: producer for partition %d fenced; pausing it",
            self.spec.name,
            part.tp.partition,
        )
        part.state.abort()
        part.closed = True
        self.metrics.transactions.labels(self.spec.name, "fenced").inc()
        assert self._consumer is not None
        self._consumer.pause(part.tp)
        await part.producer.stop()

    def _state_changes(self, part: _Partition) -> list[Outgoing]:
        out: list[Outgoing] = []
        for key, value in part.state.pending():
            sealed = None if value is None else self.keyring.seal(value, self._state_aad(key))
            out.append((self._changelog, key, sealed, [], part.tp.partition))
        return out

    def _handle_chunk(
        self, part: _Partition, records: list[Any]
    ) -> list[tuple[list[Outgoing], str | None]]:
        """Runs in a handler thread. Raises _Stopping if shutdown interrupts a retry wait."""
        out = []
        for rec in records:
            self.metrics.input_bytes.labels(self.spec.name).inc(len(rec.value or b""))
            out.append(self._handle(part, rec))
        return out

    def _handle(self, part: _Partition, rec: Any) -> tuple[list[Outgoing], str | None]:
        ctx = Context(
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            timestamp_ms=rec.timestamp,
            state=part.state if self.spec.stateful else None,
            keyring=self.keyring,
        )
        try:
            record = self.codec.decode(rec.topic, rec.key, rec.value, rec.headers, self._adapter)
        except PoisonError as exc:
            return [self._dead_letter(rec, exc.reason, exc.message, 1)], exc.reason
        attempt = 0
        delay = self.settings.retry_backoff_s
        while True:
            attempt += 1
            savepoint = part.state.savepoint()
            t0 = time.perf_counter()
            try:
                try:
                    result = self._call(record, ctx)
                finally:
                    elapsed = time.perf_counter() - t0
                    self.metrics.handler_seconds.labels(self.spec.name).observe(elapsed)
                return self._outputs(result, rec.key), None
            except RetriableError as exc:
                part.state.rollback(savepoint)
                if attempt >= self.settings.retry_attempts:
                    msg = f"gave up after {attempt} attempts: {exc}"
                    return [
                        self._dead_letter(rec, "retries_exhausted", msg, attempt)
                    ], "retries_exhausted"
                self.metrics.retries.labels(self.spec.name).inc()
                if self._stopping.wait(delay):
                    raise _Stopping() from None
                delay = min(delay * 2, self.settings.retry_backoff_max_s)
            except PoisonError as exc:
                part.state.rollback(savepoint)
                return [self._dead_letter(rec, exc.reason, exc.message, attempt)], exc.reason
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the stage
                part.state.rollback(savepoint)
                where = _where(exc)
                log.error(
                    "stage %s: handler raised %s at %s (offset %d)",
                    self.spec.name,
                    type(exc).__name__,
                    where,
                    rec.offset,
                )
                msg = f"unexpected {type(exc).__name__} in handler at {where}"
                return [self._dead_letter(rec, "handler_error", msg, attempt)], "handler_error"

    def _call(self, record: In, ctx: Context) -> HandlerResult:
        if self._is_async:
            assert self._evloop is not None
            coro = self.spec.handler(record, ctx)
            return asyncio.run_coroutine_threadsafe(coro, self._evloop).result()  # type: ignore[arg-type]
        return self.spec.handler(record, ctx)  # type: ignore[return-value]

    def _outputs(self, result: HandlerResult, in_key: bytes | None) -> list[Outgoing]:
        if result is None:
            return []
        items = [result] if isinstance(result, BaseModel | Emit) else list(result)
        out: list[Outgoing] = []
        for item in items:
            if isinstance(item, Emit):
                topic = self.settings.topic(item.topic)
                if item.key is None:
                    key = in_key
                elif isinstance(item.key, bytes):
                    key = item.key
                else:
                    key = self.keyring.keyed_hash(item.key)
                record = item.record
            else:
                if self.spec.output_topic is None:
                    raise PoisonError(
                        "handler_error",
                        "handler returned a record but the stage has no output topic",
                    )
                topic, key, record = self.settings.topic(self.spec.output_topic), in_key, item
            value, headers = self.codec.encode(topic, key, record)
            out.append((topic, key, value, headers, None))
        return out

    def _dead_letter(self, rec: Any, reason: str, message: str, attempts: int) -> Outgoing:
        log.warning(
            "stage %s: dead letter %s (partition %d offset %d)",
            self.spec.name,
            reason,
            rec.partition,
            rec.offset,
        )
        letter = DeadLetter(
            stage=self.spec.name,
            reason=reason,
            message=message[:2000],
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
            attempts=attempts,
        )
        topic = self.settings.topic("deadletter")
        value, headers = self.codec.encode(topic, rec.key, letter)
        return (topic, rec.key, value, headers, None)

    # ---- timers ---------------------------------------------------------------------------
    async def _ticks(self) -> None:
        assert self.spec.tick is not None
        now = time.monotonic()
        for part in list(self._partitions.values()):
            if part.closed or now - part.last_tick < self.spec.tick_interval_s:
                continue
            part.last_tick = now
            async with part.lock:
                if part.closed:
                    continue
                ctx = Context(
                    self._input,
                    part.tp.partition,
                    part.next_offset,
                    None,
                    0,
                    part.state,
                    self.keyring,
                )
                result = self.spec.tick(ctx, time.time())
                outgoing = self._outputs(result, None) + self._state_changes(part)
                if not outgoing:
                    continue
                try:
                    await self._commit(part, outgoing, {part.tp: part.next_offset})
                except ProducerFenced:
                    await self._fenced(part)
                    continue
                except KafkaError:
                    await self._abort(part, "aborted")
                    continue
                part.state.commit()
                self.metrics.transactions.labels(self.spec.name, "committed").inc()


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return "?"
    code = last.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{last.tb_lineno} ({code.co_name})"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: StageRunner[Any]) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._runner._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._runner._assigned(assigned)

"""A stage: input topic, output topic(s), a typed handler. The runtime does the rest.

The runner is the loop: consume (``read_committed``, no auto-commit) → dispatch in a handler
thread → produce outputs, dead letters and state changes and ``send_offsets_to_transaction`` →
commit, one transaction per batch of one input partition. The parts live apart:

* :mod:`shared.runtime.dispatch`: decode → handler → retries → encoded outputs (no Kafka);
* :mod:`shared.runtime.ownership`: assignment, fencing, committed-offset seek, state restore,
  revocation, and what to do after a failed transaction;
* :mod:`shared.runtime.transaction`: the transaction as an ``async with`` block.

``StageSpec``, ``Context``, ``Emit`` and ``HandlerResult`` are re-exported here for services.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from shared.config import Settings
from shared.metrics import HealthServer, StageMetrics
from shared.runtime.dispatch import (
    Context,
    Dispatcher,
    Emit,
    HandlerResult,
    Incoming,
    Interrupted,
    Outcome,
    Outgoing,
    RetryPolicy,
    StageSpec,
)
from shared.runtime.ownership import OwnedPartition, Ownership, restorer
from shared.runtime.transaction import Aborted, Fenced, Uncertain, transaction
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs

__all__ = ["Context", "Emit", "HandlerResult", "StageRunner", "StageSpec"]

log = logging.getLogger("radstream.runtime")

In = TypeVar("In")


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
        self.registry = registry or CollectorRegistry()
        self.metrics = StageMetrics(self.registry, spec.name)
        self._stop = asyncio.Event()
        self._stopping = threading.Event()  # seen by handler threads (retry waits)
        self._evloop: asyncio.AbstractEventLoop | None = None
        self._stop_at: float | None = None  # monotonic time of the stop request
        self.dispatcher: Dispatcher[In] = Dispatcher(
            spec,
            keyring=keyring,
            topic=settings.writer_topic,
            retry=RetryPolicy(
                settings.retry_attempts, settings.retry_backoff_s, settings.retry_backoff_max_s
            ),
            metrics=self.metrics,
            wait=self._stopping.wait,
            run_async=self._run_async,
        )
        self._group = settings.topic(spec.name)
        self._ready = False
        self._executor = ThreadPoolExecutor(settings.handler_threads, f"{spec.name}-handler")
        self._consumer: AIOKafkaConsumer | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._ownership: Ownership | None = None
        self.http = HealthServer(
            self.registry, settings.metrics_host, settings.metrics_port, lambda: self._ready
        )

    # ---- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stopping.set()
        if self._evloop is not None:
            self._evloop.call_soon_threadsafe(self._stop.set)
        else:
            self._stop.set()

    @property
    def ready(self) -> bool:
        return self._ready

    def _set_ready(self) -> None:
        self._ready = True

    def _run_async(self, coro: Any) -> HandlerResult:
        """From a handler thread: run an async handler on the stage's event loop."""
        assert self._evloop is not None
        result: HandlerResult = asyncio.run_coroutine_threadsafe(coro, self._evloop).result()
        return result

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
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
            fetch_min_bytes=self.settings.fetch_min_bytes,
            retry_backoff_ms=self.settings.producer_retry_backoff_ms,
            **common,
        )
        if self.spec.stateful:
            self._restorer = restorer(kafka)
        self._ownership = Ownership(
            stage=self.spec.name,
            settings=self.settings,
            keyring=self.keyring,
            metrics=self.metrics,
            consumer=self._consumer,
            restorer=self._restorer,
            on_assigned=self._set_ready,
        )
        try:
            if self._restorer is not None:
                await self._restorer.start()
            self._consumer.subscribe(
                [self.dispatcher.input_topic], listener=self._ownership.listener()
            )
            await self._consumer.start()
            await self._main_loop(self._consumer, self._ownership)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        async def close() -> None:
            if self._ownership is not None:
                await self._ownership.close()
            if self._consumer is not None:
                await self._consumer.stop()  # leaves the group
            if self._restorer is not None:
                await self._restorer.stop()

        try:
            # what is left of the stop's bound (at least a second: leaving the group)
            bound = self.settings.shutdown_timeout_s
            if self._stop_at is not None:
                bound = max(1.0, bound - (time.monotonic() - self._stop_at))
            await asyncio.wait_for(close(), bound)
        except TimeoutError:
            log.warning(
                "stage %s: shutdown timed out; open transactions are aborted by the broker",
                self.spec.name,
            )
        await self.http.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("stage %s: stopped", self.spec.name)

    async def _main_loop(self, consumer: AIOKafkaConsumer, ownership: Ownership) -> None:
        while not self._stop.is_set():
            # No max_records here: aiokafka then drains one partition's buffer before the
            # next, which starves partitions. Transactions are sized in _process instead.
            batches = await consumer.getmany(timeout_ms=200)
            if not await self._until_drained(self._round(ownership, batches)):
                return
            ownership.update_lag()

    async def _round(self, ownership: Ownership, batches: dict[TopicPartition, list[Any]]) -> None:
        if batches:
            await asyncio.gather(
                *(self._process(ownership, tp, recs) for tp, recs in batches.items())
            )
        if self.spec.tick is not None and not self._stop.is_set():
            await self._ticks(ownership)

    async def _until_drained(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run one round of work. After a stop request the transactions in flight get half
        of ``shutdown_timeout_s`` to finish (e.g. a broker that does not answer); then they
        are cancelled and left open, for the next owner's ``init_transactions`` to abort (the
        batch is redone there). Returns False when it cancelled the round."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=self.settings.shutdown_timeout_s / 2)
            if not task.done():
                log.warning(
                    "stage %s: stopping with a transaction in flight; the broker aborts it",
                    self.spec.name,
                )
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
                return False
            task.result()
            return True
        finally:
            stopped.cancel()
            if not task.done():  # this coroutine was cancelled itself: so is its round
                task.cancel()

    # ---- processing -----------------------------------------------------------------------
    async def _process(self, ownership: Ownership, tp: TopicPartition, records: list[Any]) -> None:
        part = ownership.get(tp)
        if part is None:
            return
        async with part.lock:
            if part.closed or ownership.get(tp) is not part:
                return
            records = [r for r in records if r.offset >= part.next_offset]
            while records and not self._stop.is_set():  # stopping: no new transaction
                done = await self._batch(ownership, part, self._chunk(records))
                if done is None:
                    return  # not committed: redone from the last committed offset (or gone)
                records = records[done:]

    def _chunk(self, records: list[Any]) -> list[Any]:
        """The records one transaction may take, by count and bytes (at least one)."""
        size = 0
        for n, rec in enumerate(records, 1):
            size += len(rec.value or b"")
            if size >= self.settings.batch_max_bytes or n >= self.settings.batch_max_records:
                return records[:n]
        return records

    async def _batch(
        self, ownership: Ownership, part: OwnedPartition, records: list[Any]
    ) -> int | None:
        """Handle a prefix of ``records`` and commit its outputs + offsets atomically; returns
        how many records it took (with ``commit_on_output``, it stops after a record with
        output for the next stage), or None if nothing was committed (then the batch is redone
        from the last committed offset, or the partition is gone)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            # decode, handle and encode off the event loop: heartbeats and other partitions'
            # transactions go on while a slow record is handled
            outcomes = await loop.run_in_executor(self._executor, self._handle, part, records)
        except Interrupted:
            await ownership.rolled_back(part, "stopping", producer_usable=True)
            return None
        outgoing = [o for outcome in outcomes for o in outcome.outgoing]
        outgoing += self.dispatcher.state_changes(part.state, part.tp.partition)
        next_offset = records[len(outcomes) - 1].offset + 1
        handled = time.perf_counter()
        if not await self._commit(ownership, part, outgoing, next_offset):
            return None
        part.next_offset = next_offset
        end = time.perf_counter()
        self.metrics.commit_seconds.labels(self.spec.name).observe(end - handled)
        self.metrics.transaction_seconds.labels(self.spec.name).observe(end - started)
        self.dispatcher.committed(outcomes, outgoing)
        return len(outcomes)

    def _handle(self, part: OwnedPartition, records: list[Incoming]) -> list[Outcome]:
        """Runs in a handler thread: handle records in order, up to and including the first
        whose outputs go to the next stage (``commit_on_output``). Raises Interrupted if
        shutdown interrupts a retry wait."""
        out: list[Outcome] = []
        for rec in records:
            self.metrics.input_wait_seconds.labels(self.spec.name).observe(
                max(0.0, time.time() - rec.timestamp / 1000)
            )
            outcome = self.dispatcher.handle(rec, part.state)
            out.append(outcome)
            if self.settings.commit_on_output and self.dispatcher.feeds_next(outcome):
                break
        if self.spec.before_commit is not None:
            self.spec.before_commit()
        return out

    async def _commit(
        self, ownership: Ownership, part: OwnedPartition, outgoing: list[Outgoing], offset: int
    ) -> bool:
        """One transaction: ``outgoing`` and the input offset. On success the partition's
        pending state is applied; otherwise ownership decides how to go on."""
        try:
            async with transaction(part.producer) as txn:
                for out in outgoing:
                    await txn.send(out)
                await txn.send_offsets({part.tp: offset}, self._group)
        except Fenced:
            await ownership.fenced(part)
            return False
        except Aborted as exc:
            log.warning(
                "stage %s: transaction on partition %d failed (%s); redoing batch",
                self.spec.name,
                part.tp.partition,
                type(exc.__cause__).__name__,
            )
            await ownership.rolled_back(part, "aborted", exc.producer_usable)
            return False
        except Uncertain as exc:
            log.warning(
                "stage %s: commit on partition %d failed (%s); re-acquiring the partition",
                self.spec.name,
                part.tp.partition,
                exc,
            )
            await ownership.recover(part)
            return False
        part.state.commit()
        self.metrics.transactions.labels(self.spec.name, "committed").inc()
        return True

    # ---- timers ---------------------------------------------------------------------------
    async def _ticks(self, ownership: Ownership) -> None:
        assert self.spec.tick is not None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for part in ownership.owned():
            if part.closed or now - part.last_tick < self.spec.tick_interval_s:
                continue
            part.last_tick = now
            async with part.lock:
                if part.closed:
                    continue
                outgoing = await loop.run_in_executor(self._executor, self._tick, part)
                if outgoing:
                    await self._commit(ownership, part, outgoing, part.next_offset)

    def _tick(self, part: OwnedPartition) -> list[Outgoing]:
        """Runs in a handler thread: the timer's outputs and state changes."""
        out = self.dispatcher.tick(part.tp.partition, part.next_offset, part.state, time.time())
        out += self.dispatcher.state_changes(part.state, part.tp.partition)
        if out and self.spec.before_commit is not None:
            self.spec.before_commit()
        return out

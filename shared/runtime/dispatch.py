"""Dispatch: one input record → decode → handler → retries with backoff → encoded outputs,
``Emit`` routing, state changes and dead letters. No Kafka client here: the Kafka runtime
(:mod:`shared.runtime.stage`) and the in-memory :class:`~shared.runtime.harness.StageHarness`
run exactly this code and differ only in where records come from and where outputs go.

Everything here may run in a handler thread; it touches no process-global state (the waiter,
the async bridge and the clock are injected).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, TypeAdapter

from shared.metrics import StageMetrics
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError, RetriableError
from shared.runtime.state import PartitionState, changelog_aad, state_purpose
from shared.schemas import DeadLetter
from shared.schemas.reasons import Reason
from shared.security.envelope import Keyring

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
    attempt: int = 1  # this try of the record (retries after a RetriableError count up)
    attempts: int = 1  # tries the retry policy allows; the last one can report, not raise

    @property
    def last_attempt(self) -> bool:
        return self.attempt >= self.attempts

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
    # called after a batch (or a timer run) is handled and before its transaction commits,
    # in the handler thread: e.g. make the blobs its outputs and state refer to durable at once
    # (one parallel sync per transaction instead of two fsyncs per object on the handler's path)
    before_commit: Callable[[], None] | None = None


class Incoming(Protocol):
    """An input record as the broker delivers it (aiokafka's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...
    @property
    def timestamp(self) -> int: ...


@dataclass(frozen=True)
class Outgoing:
    """One record to produce, already encoded. ``partition`` None: the producer's partitioner
    (by key) decides; the changelog names its partition (the input partition)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What handling one input produced: its outputs (or its dead letter) and why."""

    outgoing: list[Outgoing]
    reason: Reason | None  # None: handled; else the dead letter's reason
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; waits ``backoff_s``, doubling up to ``backoff_max_s``."""

    attempts: int
    backoff_s: float
    backoff_max_s: float

    def delays(self) -> Iterator[float]:
        """The waits between attempts: ``attempts - 1`` of them."""
        delay = self.backoff_s
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(delay * 2, self.backoff_max_s)


class Interrupted(Exception):
    """Shutdown interrupted a retry wait: the batch is abandoned (and later redone)."""


Waiter = Callable[[float], bool]
"""Waits up to ``seconds``; returns True if the stage is stopping (then no retry follows)."""

AsyncBridge = Callable[[Awaitable[HandlerResult]], HandlerResult]
"""Runs an async handler's coroutine to completion from a handler thread."""


class Dispatcher(Generic[In]):
    """Decode, handle, retry, encode — for one stage, shared by all its partitions."""

    def __init__(
        self,
        spec: StageSpec[In],
        *,
        keyring: Keyring,
        topic: Callable[[str], str],
        retry: RetryPolicy,
        metrics: StageMetrics,
        wait: Waiter,
        run_async: AsyncBridge | None = None,
    ) -> None:
        self.spec = spec
        self.keyring = keyring
        self.codec = Codec(keyring)
        self.topic = topic
        self.retry = retry
        self.metrics = metrics
        self.input_topic = topic(spec.input_topic)
        self.changelog = topic(f"{spec.name}.state")
        self.state_purpose = state_purpose(self.changelog) if spec.stateful else ""
        self.deadletter_topic = topic("deadletter")
        self.audit_topic = topic("audit")
        self._adapter: TypeAdapter[In] = TypeAdapter(spec.input_type)
        self._wait = wait
        self._run_async = run_async
        self._is_async = inspect.iscoroutinefunction(spec.handler)

    # ---- one input record -----------------------------------------------------------------
    def handle(self, rec: Incoming, state: PartitionState) -> Outcome:
        """Handle one record; its state writes stay pending in ``state`` (the caller commits
        or aborts them with the transaction). Raises :class:`Interrupted` on shutdown."""
        self.metrics.input_bytes.labels(self.spec.name).inc(len(rec.value or b""))
        ctx = Context(
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            timestamp_ms=rec.timestamp,
            state=state if self.spec.stateful else None,
            keyring=self.keyring,
            attempts=self.retry.attempts,
        )
        try:
            record = self.codec.decode(rec.topic, rec.key, rec.value, rec.headers, self._adapter)
        except PoisonError as exc:
            return self._rejected(rec, exc.reason, exc.message, 1)
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            ctx.attempt = attempt
            savepoint = state.savepoint()
            try:
                return Outcome(self.outputs(self._call(record, ctx), rec.key), None, attempt)
            except RetriableError as exc:
                state.rollback(savepoint)
                delay = next(delays, None)
                if delay is None:
                    msg = f"gave up after {attempt} attempts: {exc}"
                    return self._rejected(rec, Reason.RETRIES_EXHAUSTED, msg, attempt)
                self.metrics.retries.labels(self.spec.name).inc()
                if self._wait(delay):
                    raise Interrupted() from None
            except PoisonError as exc:
                if not exc.keep_state:
                    state.rollback(savepoint)
                return self._rejected(rec, exc.reason, exc.message, attempt)
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the stage
                state.rollback(savepoint)
                where = _where(exc)
                log.error(
                    "stage %s: handler raised %s at %s (partition %d offset %d)",
                    self.spec.name,
                    type(exc).__name__,
                    where,
                    rec.partition,
                    rec.offset,
                )
                msg = f"unexpected {type(exc).__name__} in handler at {where}"
                return self._rejected(rec, Reason.HANDLER_ERROR, msg, attempt)

    def _call(self, record: In, ctx: Context) -> HandlerResult:
        t0 = time.perf_counter()
        try:
            if self._is_async:
                if self._run_async is None:
                    raise RuntimeError("async handler but no event loop to run it on")
                coro = self.spec.handler(record, ctx)
                return self._run_async(coro)  # type: ignore[arg-type]
            return self.spec.handler(record, ctx)  # type: ignore[return-value]
        finally:
            self.metrics.handler_seconds.labels(self.spec.name).observe(time.perf_counter() - t0)

    # ---- timers ---------------------------------------------------------------------------
    def tick(
        self, partition: int, next_offset: int, state: PartitionState, now: float
    ) -> list[Outgoing]:
        """Run the stage's timer for one partition at wall-clock ``now``. A timer that raises
        is logged (type and line only) and its state writes are rolled back; the next tick
        tries again."""
        assert self.spec.tick is not None
        ctx = Context(self.input_topic, partition, next_offset, None, 0, state, self.keyring)
        savepoint = state.savepoint()
        try:
            return self.outputs(self.spec.tick(ctx, now), None)
        except Exception as exc:  # noqa: BLE001 - a timer bug must not kill the stage
            state.rollback(savepoint)
            self.metrics.tick_errors.labels(self.spec.name).inc()
            log.error(
                "stage %s: tick raised %s at %s (partition %d)",
                self.spec.name,
                type(exc).__name__,
                _where(exc),
                partition,
            )
            return []

    # ---- encoding -------------------------------------------------------------------------
    def outputs(self, result: HandlerResult, in_key: bytes | None) -> list[Outgoing]:
        """A handler's result as encoded records: a bare model goes to the stage's output
        topic under the input key; an :class:`Emit` names its topic and key."""
        if result is None:
            return []
        items = [result] if isinstance(result, BaseModel | Emit) else list(result)
        out: list[Outgoing] = []
        for item in items:
            if isinstance(item, Emit):
                topic = self.topic(item.topic)
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
                        Reason.HANDLER_ERROR,
                        "handler returned a record but the stage has no output topic",
                    )
                topic, key, record = self.topic(self.spec.output_topic), in_key, item
            value, headers = self.codec.encode(topic, key, record)
            out.append(Outgoing(topic, key, value, headers))
        return out

    def state_changes(self, state: PartitionState, partition: int) -> list[Outgoing]:
        """The open transaction's state writes, sealed for the changelog (its partition =
        the input partition; a delete is a tombstone)."""
        out: list[Outgoing] = []
        for key, value in state.pending():
            aad = changelog_aad(self.changelog, key)
            sealed = None if value is None else self.keyring.seal(value, aad, self.state_purpose)
            out.append(Outgoing(self.changelog, key, sealed, [], partition))
        return out

    def dead_letter(self, rec: Incoming, reason: Reason, message: str, attempts: int) -> Outgoing:
        """The dead letter of ``rec``: stage, reason, source coordinates; never PHI."""
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
        value, headers = self.codec.encode(self.deadletter_topic, rec.key, letter)
        return Outgoing(self.deadletter_topic, rec.key, value, headers)

    def _rejected(self, rec: Incoming, reason: Reason, message: str, attempts: int) -> Outcome:
        return Outcome([self.dead_letter(rec, reason, message, attempts)], reason, attempts)

    def feeds_next(self, outcome: Outcome) -> bool:
        """Did handling produce a record another stage or party waits for (not a dead letter,
        a state change or an audit event)?"""
        quiet = {self.deadletter_topic, self.changelog, self.audit_topic}
        return any(o.topic not in quiet for o in outcome.outgoing)

    # ---- after the commit -----------------------------------------------------------------
    def committed(self, outcomes: Sequence[Outcome], outgoing: Sequence[Outgoing]) -> None:
        """Count a committed transaction's inputs (ok / dead letter by reason) and outputs."""
        self.metrics.outputs.labels(self.spec.name).inc(
            sum(1 for o in outgoing if o.topic != self.changelog)
        )
        for outcome in outcomes:
            if outcome.reason is None:
                self.metrics.messages.labels(self.spec.name, "ok").inc()
            else:
                self.metrics.dead_letter(outcome.reason)


def _where(exc: BaseException) -> str:
    """File, line and function where ``exc`` was raised: no message, so no PHI."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return "?"
    code = last.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{last.tb_lineno} ({code.co_name})"

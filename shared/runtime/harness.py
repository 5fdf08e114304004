"""A stage in memory, for tests that run in milliseconds (in the spirit of FastStream's
``TestKafkaBroker`` and Bytewax's ``TestingSource``/``TestingSink``)::

    harness = StageHarness(build(settings, keyring, registry), settings, keyring)
    result = harness.send(InstanceData(source="t", data=dicom), key=series_uid)
    result.outputs["series"], result.dead_letters, result.state_changes
    harness.advance(31.0)  # a fake clock: timers fire, nothing sleeps

It runs the Kafka runtime's own :class:`~shared.runtime.dispatch.Dispatcher` (decode → handler
→ retries → ``Emit`` routing → dead letters) and its :class:`~shared.runtime.codec.Codec`
(envelope encryption, associated data, schema versions): inputs are encoded and outputs are
decoded exactly as on the wire. What it leaves out is the broker: each ``send`` is one
committed transaction of one record on one partition; ownership, fencing and the transaction
protocol are proven against the real broker (``tests/integration/test_runtime.py``,
``test_exactly_once.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, TypeAdapter

from shared.config import Settings
from shared.metrics import StageMetrics
from shared.runtime.codec import Codec, header
from shared.runtime.dispatch import (
    Dispatcher,
    HandlerResult,
    Outcome,
    Outgoing,
    RetryPolicy,
    StageSpec,
)
from shared.runtime.state import PartitionState, changelog_aad
from shared.schemas import RECORD_TYPES, DeadLetter
from shared.security.envelope import Keyring

In = TypeVar("In")


class FakeClock:
    """The harness's wall clock: retry backoff and timers advance it instead of sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.waits: list[float] = []  # every retry backoff the dispatcher asked for

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, seconds: float) -> bool:
        """The dispatcher's retry wait: recorded, the clock moves on; never 'stopping'."""
        self.waits.append(seconds)
        self.now += seconds
        return False


@dataclass(frozen=True)
class InputRecord:
    """An input record as the broker would deliver it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp: int


@dataclass(frozen=True)
class Produced:
    """One record the stage produced, as the broker got it, and decoded."""

    topic: str  # logical name, e.g. "series", "deadletter", "ingest.state"
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    record: BaseModel | None  # decoded through the codec; None for changelog entries


@dataclass(frozen=True)
class StateChange:
    """One changelog entry, opened: the value the handler put, or None for a delete."""

    partition: int
    key: bytes
    value: Any | None


@dataclass
class Result:
    """What one transaction (a ``send`` or a timer run) committed."""

    outcomes: list[Outcome] = field(default_factory=list)
    produced: list[Produced] = field(default_factory=list)
    state_changes: list[StateChange] = field(default_factory=list)

    @property
    def outputs(self) -> dict[str, list[BaseModel]]:
        """Records by logical topic, dead letters and changelog excluded."""
        out: dict[str, list[BaseModel]] = {}
        for p in self.produced:
            if p.record is not None and p.topic != "deadletter":
                out.setdefault(p.topic, []).append(p.record)
        return out

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return [p.record for p in self.produced if isinstance(p.record, DeadLetter)]

    def extend(self, other: Result) -> None:
        self.outcomes += other.outcomes
        self.produced += other.produced
        self.state_changes += other.state_changes


class StageHarness(Generic[In]):
    """Feed a :class:`StageSpec` records in memory; see the module docstring."""

    def __init__(
        self,
        spec: StageSpec[In],
        settings: Settings | None = None,
        keyring: Keyring | None = None,
        *,
        registry: CollectorRegistry | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings or Settings()
        self.keyring = keyring or Keyring.generate()
        self.codec = Codec(self.keyring)
        self.clock = clock or FakeClock()
        self.registry = registry or CollectorRegistry()
        self.metrics = StageMetrics(self.registry, spec.name)
        s = self.settings
        self.dispatcher: Dispatcher[In] = Dispatcher(
            spec,
            keyring=self.keyring,
            topic=s.topic,
            retry=RetryPolicy(s.retry_attempts, s.retry_backoff_s, s.retry_backoff_max_s),
            metrics=self.metrics,
            wait=self.clock.wait,
            run_async=_run_coroutine,
        )
        self.history = Result()  # everything committed so far
        self._states: dict[int, PartitionState] = {}
        self._next_offset: dict[int, int] = {}
        self._last_tick = self.clock.time()
        self._adapters: dict[type[BaseModel], TypeAdapter[Any]] = {}

    # ---- inputs ---------------------------------------------------------------------------
    def send(
        self, record: BaseModel, *, key: str | bytes | None = None, partition: int = 0
    ) -> Result:
        """Encode ``record`` for the input topic (as a producer would) and handle it. A ``str``
        key is an identity (keyed-hashed, e.g. a SeriesInstanceUID); ``bytes`` is used as is."""
        raw_key = self.keyring.keyed_hash(key) if isinstance(key, str) else key
        value, headers = self.codec.encode(self.dispatcher.input_topic, raw_key, record)
        return self.send_raw(value, headers, key=raw_key, partition=partition)

    def send_raw(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        *,
        key: bytes | None = None,
        partition: int = 0,
    ) -> Result:
        """Handle raw bytes exactly as they would arrive from the broker (tampered envelopes,
        missing headers, other schema versions...)."""
        offset = self._next_offset.get(partition, 0)
        rec = InputRecord(
            self.dispatcher.input_topic,
            partition,
            offset,
            key,
            value,
            list(headers),
            int(self.clock.time() * 1000),
        )
        state = self.state(partition)
        outcome = self.dispatcher.handle(rec, state)
        result = self._commit(partition, [outcome], outcome.outgoing)
        self._next_offset[partition] = offset + 1
        return result

    # ---- timers ---------------------------------------------------------------------------
    def tick(self) -> Result:
        """Run the stage's timer now on every partition seen so far (one transaction each)."""
        result = Result()
        if self.spec.tick is None:
            return result
        self._last_tick = self.clock.time()
        for partition in sorted(self._states) or [0]:
            state = self.state(partition)
            offset = self._next_offset.get(partition, 0)
            out = self.dispatcher.tick(partition, offset, state, self.clock.time())
            result.extend(self._commit(partition, [], out))
        return result

    def advance(self, seconds: float) -> Result:
        """Let ``seconds`` of wall-clock time pass: timers fire every ``tick_interval_s`` on the
        way, as the runtime's loop would fire them."""
        result = Result()
        end = self.clock.time() + seconds
        if self.spec.tick is not None:
            interval = max(self.spec.tick_interval_s, 1e-3)
            while self._last_tick + interval <= end:
                self.clock.now = self._last_tick + interval
                result.extend(self.tick())
        self.clock.now = end
        return result

    # ---- inspection -----------------------------------------------------------------------
    def state(self, partition: int = 0) -> PartitionState:
        """The partition's state store (committed values; pending only inside a handler)."""
        return self._states.setdefault(partition, PartitionState())

    def outputs(self, topic: str) -> list[BaseModel]:
        """Every record committed to logical ``topic`` so far."""
        return self.history.outputs.get(topic, [])

    @property
    def dead_letters(self) -> list[DeadLetter]:
        return self.history.dead_letters

    # ---- the transaction ------------------------------------------------------------------
    def _commit(self, partition: int, outcomes: list[Outcome], outgoing: list[Outgoing]) -> Result:
        """What the runtime's transaction would write: outputs, dead letters, then the state
        changes sealed for the changelog; then the state's pending writes apply."""
        state = self.state(partition)
        outgoing = outgoing + self.dispatcher.state_changes(state, partition)
        if (outcomes or outgoing) and self.spec.before_commit is not None:
            self.spec.before_commit()  # as the runtime: after handling, before the commit
        result = Result(outcomes=outcomes)
        for out in outgoing:
            result.produced.append(self._decoded(out))
            if out.topic == self.dispatcher.changelog:
                assert out.key is not None
                result.state_changes.append(
                    StateChange(partition, out.key, self._opened(out.key, out.value))
                )
        state.commit()
        self.dispatcher.committed(outcomes, outgoing)
        self.history.extend(result)
        return result

    def _logical(self, topic: str) -> str:
        prefix = self.settings.topic_prefix
        return topic[len(prefix) :] if topic.startswith(prefix) else topic

    def _decoded(self, out: Outgoing) -> Produced:
        record: BaseModel | None = None
        if out.topic != self.dispatcher.changelog:
            model = RECORD_TYPES[header(out.headers, "rs-schema").decode()]
            adapter = self._adapters.get(model) or self._adapters.setdefault(
                model, TypeAdapter(model)
            )
            record = self.codec.decode(out.topic, out.key, out.value, out.headers, adapter)
        return Produced(self._logical(out.topic), out.key, out.value, out.headers, record)

    def _opened(self, key: bytes, value: bytes | None) -> Any | None:
        if value is None:
            return None
        return json.loads(self.keyring.open(value, changelog_aad(self.dispatcher.changelog, key)))


def _run_coroutine(coro: Awaitable[HandlerResult]) -> HandlerResult:
    """An async handler's coroutine, run to completion on a private event loop (in a thread of
    its own, so that the harness also works inside an async test)."""

    async def run() -> HandlerResult:
        return await coro

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()

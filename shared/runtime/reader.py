"""Read a topic as an outside party (operator, alert consumer): all partitions, committed
records only, decrypted and validated. Used by the CLI's feeds (dead letters, alerts)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from shared.config import KafkaSettings
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs

T = TypeVar("T")


@dataclass(frozen=True)
class Item(Generic[T]):
    record: T | None
    error: str | None
    partition: int
    offset: int
    timestamp_ms: int


async def read_topic(
    kafka: KafkaSettings,
    topic: str,
    model: Any,
    keyring: Keyring,
    *,
    follow: bool = False,
    timeout_s: float | None = None,
    from_beginning: bool = True,
    on_start: Callable[[], None] | None = None,
) -> AsyncIterator[Item[Any]]:
    """Yield records of ``topic``. Without ``follow``, stops at the end seen at start; with it,
    keeps waiting for new records until ``timeout_s`` (forever if None). ``on_start`` is
    called once the start positions are set (from then on nothing published is missed)."""
    adapter: TypeAdapter[Any] = TypeAdapter(model)
    codec = Codec(keyring)
    consumer = AIOKafkaConsumer(
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        max_partition_fetch_bytes=kafka.max_message_bytes,
        **client_kwargs(kafka),
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client._wait_on_metadata(topic)
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        # offsets first, then assign + seek with no await between: seek_to_* would race the
        # fetcher's own reset (see shared.runtime.ownership.restore_partition)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps) if from_beginning else ends
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        if on_start is not None:
            on_start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not follow:
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= ends[tp] for tp in tps):
                    return
            batches = await consumer.getmany(timeout_ms=200)
            for recs in batches.values():
                for rec in recs:
                    try:
                        value = codec.decode(rec.topic, rec.key, rec.value, rec.headers, adapter)
                        yield Item(value, None, rec.partition, rec.offset, rec.timestamp)
                    except PoisonError as exc:
                        yield Item(None, exc.reason, rec.partition, rec.offset, rec.timestamp)
    finally:
        await consumer.stop()


async def latest_for_series(
    kafka: KafkaSettings,
    topic: str,
    model: Any,
    keyring: Keyring,
    series_instance_uid: str,
    *,
    wait_s: float = 0.0,
    revision: int | None = None,
) -> Any | None:
    """The highest revision of ``series_instance_uid`` on ``topic`` (or that ``revision``);
    when there is none yet and ``wait_s`` > 0, the first one that arrives within ``wait_s``
    seconds."""

    def wanted(rec: Any) -> bool:
        return bool(
            rec is not None
            and rec.series_instance_uid == series_instance_uid
            and (revision is None or rec.revision == revision)
        )

    latest = None
    async for item in read_topic(kafka, topic, model, keyring):
        rec: Any = item.record
        if wanted(rec) and (latest is None or rec.revision >= latest.revision):
            latest = rec
    if latest is not None or wait_s <= 0:
        return latest
    async for item in read_topic(
        kafka, topic, model, keyring, follow=True, timeout_s=wait_s, from_beginning=False
    ):
        if wanted(item.record):
            return item.record
    return None

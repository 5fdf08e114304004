"""Scanner SDK: publish DICOM instances to ``instances`` as a scanner (or gateway) principal.

Each file's bytes go as they are (ingest judges them), one instance per message, encrypted,
keyed by the keyed hash of its SeriesInstanceUID (a file whose series cannot be read is keyed
from a hash of its bytes). :meth:`end_series` sends the end-of-series marker with the count.
Every send is acknowledged by the broker (``acks=all``, idempotent producer) before the
publish call returns; a failure raises :class:`PublishError`.

    async with Publisher(kafka, keyring, source="ct-scanner-1") as pub:
        for data in files:
            await pub.publish(data)
        await pub.end_series(series_uid, count)
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.config import KafkaSettings
from shared.dicom.safe import series_uid_or_none
from shared.runtime.codec import Codec
from shared.schemas import EndOfSeries, InstanceData, Record
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs


class PublishError(Exception):
    """The broker did not acknowledge a message."""


@dataclass
class Published:
    series_instance_uid: str | None
    key: bytes
    size: int


@dataclass
class Publisher:
    kafka: KafkaSettings
    keyring: Keyring
    source: str = "sdk"
    topic: str = "radstream.instances"
    _producer: AIOKafkaProducer | None = field(default=None, init=False)

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            max_request_size=self.kafka.max_message_bytes,
            linger_ms=2,
            request_timeout_ms=30000,
            **client_kwargs(self.kafka),
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def key_for(self, data: bytes) -> tuple[str | None, bytes]:
        uid = series_uid_or_none(data)
        if uid is not None:
            return uid, self.keyring.keyed_hash(uid)
        return None, self.keyring.keyed_hash("bytes:" + hashlib.sha256(data).hexdigest())

    async def _send(self, key: bytes, record: Record, topic: str | None = None) -> None:
        assert self._producer is not None, "start() the publisher first"
        topic = topic or self.topic
        codec = Codec(self.keyring)
        value, headers = codec.encode(topic, key, record)
        if len(value) > self.kafka.max_message_bytes:
            raise PublishError(
                f"message of {len(value)} bytes exceeds the {self.kafka.max_message_bytes} cap"
            )
        try:
            fut = await self._producer.send(topic, value, key=key, headers=headers)
            await fut
        except KafkaError as exc:
            raise PublishError(f"broker did not acknowledge: {type(exc).__name__}") from exc

    async def publish(self, data: bytes) -> Published:
        uid, key = self.key_for(data)
        await self._send(key, InstanceData(source=self.source, data=data))
        return Published(uid, key, len(data))

    async def publish_many(self, items: Iterable[bytes], window: int = 16) -> list[Published]:
        """Publish with up to ``window`` sends in flight; order within a series is kept."""
        sem = asyncio.Semaphore(window)
        out: list[Published] = []

        async def one(data: bytes) -> None:
            async with sem:
                out.append(await self.publish(data))

        await asyncio.gather(*(one(d) for d in items))
        return out

    async def end_series(self, series_instance_uid: str, count: int) -> None:
        key = self.keyring.keyed_hash(series_instance_uid)
        marker = EndOfSeries(
            source=self.source, series_instance_uid=series_instance_uid, expected_count=count
        )
        await self._send(key, marker)

    async def emit(self, topic: str, key: bytes, record: Record) -> None:
        """Send one record to another topic the principal may write (the gateway: dead
        letters and audit), on the same producer; acknowledged before it returns."""
        await self._send(key, record, topic)

"""Restoring keyed state from its changelog, against the real broker: every committed record,
every time. (``seek_to_beginning`` raced the fetcher's own reset to *latest* and sometimes
restored nothing: a restarted ingest forgot its series, the alert stage its raised ids.)"""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from shared.runtime.ownership import restore_partition, restorer
from shared.runtime.state import PartitionState, changelog_aad
from tests.helpers import Env

pytestmark = pytest.mark.integration

KEYS = 40


async def write_changelog(env: Env, changelog: str) -> None:
    """What a stateful stage writes: sealed values in transactions (and an aborted one)."""
    producer = AIOKafkaProducer(
        transactional_id=f"{env.prefix}ingest.restore-test", **env.kafka("ingest")
    )
    await producer.start()
    try:
        for partition in range(env.partitions):
            for chunk in range(4):
                async with producer.transaction():
                    for i in range(chunk * KEYS // 4, (chunk + 1) * KEYS // 4):
                        key = f"p{partition}-k{i}".encode()
                        value = json.dumps({"n": i}).encode()
                        sealed = env.keyring.seal(value, changelog_aad(changelog, key), "instances")
                        await producer.send(changelog, sealed, key=key, partition=partition)
            await producer.begin_transaction()  # an aborted write is never restored
            key = f"p{partition}-aborted".encode()
            sealed = env.keyring.seal(b"{}", changelog_aad(changelog, key), "instances")
            await producer.send(changelog, sealed, key=key, partition=partition)
            await producer.abort_transaction()
    finally:
        await producer.stop()


async def test_every_restore_reads_every_committed_record(env: Env) -> None:
    changelog = env.topic("ingest.state")
    await write_changelog(env, changelog)
    kafka = env.broker.settings_for("ingest")
    for attempt in range(6):  # a fresh consumer each time, as a restarted stage has
        consumer = restorer(kafka)
        await consumer.start()
        try:
            for partition in range(env.partitions):
                state = PartitionState()
                await restore_partition(consumer, changelog, partition, env.keyring, state)
                keys = sorted(state.keys())
                assert len(keys) == KEYS, (attempt, partition, len(keys))
                assert all(k.startswith(f"p{partition}-k".encode()) for k in keys)
                assert state.get(f"p{partition}-k7".encode()) == {"n": 7}
            tp = TopicPartition(changelog, env.partitions - 1)
            assert await consumer.position(tp) == (await consumer.end_offsets([tp]))[tp]
        finally:
            await consumer.stop()

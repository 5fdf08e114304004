"""The runtime against the real broker: dead letters, envelopes, key rotation, metrics."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from shared.runtime.passthrough import make_spec
from shared.runtime.stage import StageRunner
from shared.schemas import DeadLetter, Probe
from shared.security.envelope import Keyring, rotate_keyring_file
from shared.stack.broker import free_port
from tests.helpers import Env, Reader, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def stage(env: Env) -> AsyncIterator[StageRunner[Probe]]:
    settings = env.settings("preprocess", metrics_port=free_port(), retry_backoff_s=0.05)
    runner: StageRunner[Probe] = StageRunner(make_spec("preprocess"), settings, env.keyring)
    task = asyncio.create_task(runner.run())
    await wait_until(lambda: _ready(runner), 60, "stage ready")
    yield runner
    runner.stop()
    await asyncio.wait_for(task, 20)


async def _ready(runner: StageRunner[Probe]) -> bool:
    return runner.ready


def key(i: int) -> bytes:
    return f"series-{i % 3}".encode()


async def test_poison_goes_to_dead_letter_and_stage_moves_on(
    env: Env, stage: StageRunner[Probe]
) -> None:
    probes = [Probe(id=f"p{i}", seq=i, poison=(i == 3)) for i in range(8)]
    await env.produce("series", [(b"same-series", p) for p in probes])
    async with Reader(env, "volumes", Probe) as out, Reader(env, "deadletter", DeadLetter) as dlq:
        await out.wait_for(7)
        await dlq.wait_for(1)
        await out.drain(0.5)
        assert sorted(p.seq for p in out.records) == [0, 1, 2, 4, 5, 6, 7]
        (letter,) = dlq.records
        assert letter.stage == "preprocess"
        assert letter.reason == "poison"
        assert letter.source_topic == env.topic("series")
        assert letter.source_offset == 3
        assert dlq.raw[0].key == b"same-series"


async def test_tampered_and_foreign_envelopes_are_rejected(
    env: Env, stage: StageRunner[Probe]
) -> None:
    codec = env.codec
    topic = env.topic("series")
    good_v, good_h = codec.encode(topic, b"k", Probe(id="good", seq=0))
    flipped = bytearray(good_v)
    flipped[-20] ^= 0x01  # a bit in the ciphertext
    # associated data changed: the same ciphertext under another key, and another schema header
    wrong_schema = [("rs-schema", b"radstream.alert"), ("rs-version", b"1")]
    stranger = Keyring.generate()  # a key id this keyring never held
    from shared.runtime.codec import Codec

    unknown_v, unknown_h = Codec(stranger).encode(topic, b"k", Probe(id="stranger", seq=9))
    await env.produce_raw(
        "series",
        [
            (b"k", bytes(flipped), good_h),
            (b"other-key", good_v, good_h),
            (b"k", good_v, wrong_schema),
            (b"k", unknown_v, unknown_h),
            (b"k", b"", good_h),
            (b"k", good_v, []),
            (b"k", good_v, good_h),
        ],
    )
    async with Reader(env, "volumes", Probe) as out, Reader(env, "deadletter", DeadLetter) as dlq:
        await dlq.wait_for(6)
        await out.wait_for(1)
        await out.drain(0.5)
        assert [p.id for p in out.records] == ["good"]
        by_key: dict[bytes, list[tuple[int, str]]] = {}
        for rec, letter in zip(dlq.raw, dlq.records, strict=True):
            by_key.setdefault(rec.key, []).append((letter.source_offset, letter.reason))
        # same key: in order on one partition; the moved ciphertext went elsewhere
        assert sorted(by_key[b"k"]) == [
            (0, "integrity"),  # flipped ciphertext bit
            (1, "integrity"),  # schema header changed (associated data)
            (2, "unknown_key"),
            (3, "empty"),
            (4, "missing_header"),
        ]
        assert by_key[b"other-key"] == [(0, "integrity")]  # replayed under another key
        # nothing of the payload leaks into the dead letters
        assert all("good" not in letter.message for letter in dlq.records)


async def test_rotated_out_key_still_decrypts(env: Env, stage: StageRunner[Probe]) -> None:
    old_kid = env.keyring.active_key_id("series")
    await env.produce("series", [(b"k", Probe(id="before-rotation", seq=0))])
    new = rotate_keyring_file(env.keyring_path)
    assert new["series"] != old_kid
    new_kid = new["volumes"]  # what the stage's output is sealed for
    rotated = Keyring.from_file(env.keyring_path)
    assert rotated.active_key_id("series") == new["series"] and old_kid in rotated.key_ids
    env.keyring = rotated
    await env.produce("series", [(b"k", Probe(id="after-rotation", seq=1))])
    async with Reader(env, "volumes", Probe) as out:
        await out.wait_for(2)
        assert [p.id for p in out.records] == ["before-rotation", "after-rotation"]
        # the stage picked the rotation up without restart: its output uses the new key
        assert all(rec.value[5 : 5 + len(new_kid)] == new_kid.encode() for rec in out.raw[1:])


async def test_metrics_and_readiness(env: Env, stage: StageRunner[Probe]) -> None:
    await env.produce(
        "series", [(key(i), Probe(id=str(i), seq=i, poison=i == 0)) for i in range(5)]
    )
    async with Reader(env, "volumes", Probe) as out:
        await out.wait_for(4)
    base = f"http://127.0.0.1:{stage.http.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
            body = await r.json()
            assert body["ready"] is True
            assert body["pid"] == os.getpid()  # the answer names its process
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200

        async def counted() -> bool:
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            return 'radstream_messages_total{outcome="ok",stage="preprocess"} 4.0' in text

        await wait_until(counted, 10, "ok counter")
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    assert 'radstream_deadletters_total{reason="poison",stage="preprocess"} 1.0' in text
    assert "radstream_handler_seconds_bucket" in text
    assert "radstream_transaction_seconds_count" in text
    assert 'radstream_transactions_total{outcome="committed",stage="preprocess"}' in text
    assert 'radstream_consumer_lag_messages{partition="0",stage="preprocess"}' in text
    assert 'radstream_assigned_partitions{stage="preprocess"} 3.0' in text


async def test_slow_record_keeps_heartbeats_and_causes_no_rebalance(env: Env) -> None:
    # a record that takes 2x the session timeout (broker minimum: 6 s) to handle: the handler runs off the event
    # loop, heartbeats go on, the group never rebalances and the other partitions keep flowing
    settings = env.settings("preprocess", metrics_port=free_port(), session_timeout_s=6.0)
    slow_spec = make_spec("preprocess", delay_s=13.0)
    runner: StageRunner[Probe] = StageRunner(slow_spec, settings, env.keyring)
    task = asyncio.create_task(runner.run())
    try:
        await wait_until(lambda: _ready(runner), 60, "stage ready")
        await env.produce("series", [(b"slow-series", Probe(id="slow", seq=0))])
        async with Reader(env, "volumes", Probe) as out:
            await out.wait_for(1, timeout=60)
        revoked = runner.registry.get_sample_value(
            "radstream_rebalance_events_total", {"stage": "preprocess", "event": "revoked"}
        )
        assigned = runner.registry.get_sample_value(
            "radstream_rebalance_events_total", {"stage": "preprocess", "event": "assigned"}
        )
        assert revoked is None or revoked == 0
        assert assigned == 1
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)

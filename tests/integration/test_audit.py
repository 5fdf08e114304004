"""The audit trail against the real broker: each principal writes only its own intake topic,
the sequencer chains what arrives with the broker-verified principal, ``radstream audit
--verify`` accepts the chain and detects a forged entry, ``--syslog`` exports RFC 5424."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from prometheus_client import CollectorRegistry

from services.auditlog.core import KEY, Sequencer
from shared.runtime.audit import emit_audit
from shared.schemas import AuditEntry, AuditEvent
from shared.security.audit import entry_hash
from shared.security.envelope import Keyring
from tests.helpers import Env, Reader
from tests.integration.test_cli import run_cli

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def sequencer(env: Env) -> AsyncIterator[Sequencer]:
    seq = Sequencer(
        env.settings("auditlog"), Keyring.from_file(env.key_file("auditlog")), CollectorRegistry()
    )
    stop = asyncio.Event()
    task = asyncio.create_task(seq.run(stop))
    try:
        yield seq
    finally:
        stop.set()
        await task


async def write_as(env: Env, principal: str, topic: str, event: AuditEvent) -> None:
    """``principal`` writes ``event`` to ``topic`` with its own key file."""
    keyring = Keyring.from_file(env.key_file(principal))
    producer = AIOKafkaProducer(request_timeout_ms=10000, **env.kafka(principal))
    await producer.start()
    try:
        from shared.runtime.codec import Codec

        full = env.topic(topic)
        value, headers = Codec(keyring).encode(full, b"k", event)
        await producer.send_and_wait(full, value, key=b"k", headers=headers)
    finally:
        await producer.stop()


async def test_the_trail_names_the_broker_verified_principal_and_detects_a_forgery(
    env: Env,
) -> None:
    claimed = AuditEvent(actor="operator", action="read:alerts", resource="x", outcome="success")
    # the attack: the pager credential writes the trail directly, or another's intake topic
    for topic in ("audit", "audit.in.operator"):
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(write_as(env, "alert-consumer", topic, claimed), 45)

    async with sequencer(env):
        operator = env.settings("operator")
        await emit_audit(operator, Keyring.from_file(env.key_file("operator")), "replay:x", "k1")
        # it claims to be the operator; the trail says who wrote it
        await write_as(env, "alert-consumer", "audit.in.alert-consumer", claimed)
        async with Reader(env, "audit", AuditEntry) as trail:
            entries = await trail.wait_for(2, timeout=60)
    by_action = {e.action: e for e in entries}
    assert by_action["replay:x"].principal == "operator"
    assert by_action["read:alerts"].principal == "alert-consumer"
    assert by_action["read:alerts"].actor == "operator"  # the claim is kept, not believed
    assert sorted(e.seq for e in entries) == [0, 1]

    cli_env = env.service_env("auditor")
    ok = run_cli(["audit", "--verify"], cli_env)
    assert ok.returncode == 0 and "intact: 2 entries" in ok.stdout, ok.stderr
    lines = run_cli(["audit", "--syslog"], cli_env).stdout.splitlines()
    assert len(lines) == 2
    assert all(
        re.match(r"^<\d{1,3}>1 \S+ \S+ radstream - \S+ \[radstream@32473 ", x) for x in lines
    )
    assert any('principal="alert-consumer"' in x and 'actor="operator"' in x for x in lines)

    # someone with the broker's super user and the audit key appends an edited copy of an
    # entry (its hash recomputed): the chain no longer verifies
    first = min(entries, key=lambda e: e.seq)
    forged = first.model_copy(update={"resource": "nothing to see"})
    forged = forged.model_copy(update={"hash": entry_hash(forged)})
    await env.produce("audit", [(KEY, forged)])
    broken = run_cli(["audit", "--verify"], cli_env)
    assert broken.returncode == 1
    assert "seq 0: expected seq 2" in broken.stderr and "BROKEN" in broken.stderr


async def test_the_sequencer_continues_the_chain_after_a_restart(env: Env) -> None:
    operator = env.settings("operator")
    keys = Keyring.from_file(env.key_file("operator"))
    async with sequencer(env):
        await emit_audit(operator, keys, "read:deadletter", "t")
        async with Reader(env, "audit", AuditEntry) as trail:
            await trail.wait_for(1, timeout=60)
    await emit_audit(operator, keys, "read:results", "t")  # while no sequencer runs
    async with sequencer(env):
        async with Reader(env, "audit", AuditEntry) as trail:
            entries = await trail.wait_for(2, timeout=60)
            await trail.drain(1.0)
    assert [e.seq for e in trail.records] == [0, 1]
    assert entries[1].prev == entries[0].hash
    assert [e.action for e in trail.records] == ["read:deadletter", "read:results"]

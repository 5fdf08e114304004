"""Least privilege at the broker: every principal's forbidden operations fail, allowed ones work.

Each test bootstraps its own copy of the whole access matrix (own prefix) on the real broker.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.helpers import create_ssl_context

from shared.schemas import Probe
from tests.helpers import Env, collect_refused_sockets

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("collect_refused_clients")]


async def produce(env: Env, principal: str, topic: str, **kw: Any) -> None:
    producer = AIOKafkaProducer(request_timeout_ms=10000, **env.kafka(principal), **kw)
    try:
        await producer.start()
        if kw.get("transactional_id"):
            async with producer.transaction():
                await producer.send_and_wait(env.topic(topic), b"x", key=b"k")
        else:
            await producer.send_and_wait(env.topic(topic), b"x", key=b"k")
    finally:
        await producer.stop()


async def consume(env: Env, principal: str, topic: str, group: str | None = None) -> int:
    """Reads ``topic`` (in ``group`` if given) for a few seconds; returns the records read and
    raises what the broker says (fetch and join errors surface on the next ``getmany``)."""
    consumer = AIOKafkaConsumer(
        env.topic(topic),
        group_id=env.topic(group) if group else None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=10000,
        **env.kafka(principal),
    )
    read = 0
    try:
        await consumer.start()  # raises at once without DESCRIBE on the topic
        for _ in range(15):
            batches = await consumer.getmany(timeout_ms=300)
            read += sum(len(v) for v in batches.values())
            if read:
                break
        if group:
            assert consumer.assignment(), "joined no group"
    finally:
        await consumer.stop()
    return read


async def seed(env: Env, topic: str) -> None:
    await produce(env, "admin", topic)


async def denied(action: Awaitable[Any], *errors: type[BaseException]) -> BaseException:
    with pytest.raises(errors) as info:
        await asyncio.wait_for(action, 45)
    collect_refused_sockets()
    return info.value


async def test_stage_writes_only_its_outputs(env: Env) -> None:
    await produce(env, "preprocess", "deadletter")  # allowed
    await denied(produce(env, "preprocess", "findings"), TopicAuthorizationFailedError)
    await denied(produce(env, "preprocess", "instances"), TopicAuthorizationFailedError)
    await denied(produce(env, "segmentation", "alerts"), TopicAuthorizationFailedError)


async def test_stage_uses_only_its_group_and_transactional_ids(env: Env) -> None:
    await produce(env, "preprocess", "volumes", transactional_id=env.topic("preprocess.0"))
    await seed(env, "series")
    assert await consume(env, "preprocess", "series", group="preprocess") == 1
    await denied(
        produce(env, "ingest", "series", transactional_id=env.topic("preprocess.0")),
        TransactionalIdAuthorizationFailed,
    )
    await denied(
        consume(env, "ingest", "instances", group="preprocess"), GroupAuthorizationFailedError
    )
    await denied(consume(env, "preprocess", "instances"), TopicAuthorizationFailedError)


async def test_scanner_can_publish_instances_and_read_nothing(env: Env) -> None:
    await env.produce("instances", [(b"k", Probe(id="scan", seq=0))], principal="scanner")
    for topic in ("instances", "series", "alerts", "deadletter"):
        await denied(consume(env, "scanner", topic), TopicAuthorizationFailedError)
    await denied(produce(env, "scanner", "series"), TopicAuthorizationFailedError)


async def test_alert_consumer_reads_alerts_and_results_only(env: Env) -> None:
    await seed(env, "alerts")
    await seed(env, "results")
    assert await consume(env, "alert-consumer", "alerts", group="alert-consumer") == 1
    assert await consume(env, "alert-consumer", "results", group="alert-consumer") == 1
    for topic in ("instances", "series", "volumes", "findings"):
        await denied(consume(env, "alert-consumer", topic), TopicAuthorizationFailedError)
    await denied(produce(env, "alert-consumer", "alerts"), TopicAuthorizationFailedError)
    await denied(
        consume(env, "alert-consumer", "alerts", group="alert"), GroupAuthorizationFailedError
    )


async def test_worklist_reads_alerts_results_acks_and_writes_only_acks_and_its_audit(
    env: Env,
) -> None:
    for topic in ("alerts", "results", "acks"):
        await seed(env, topic)
        assert await consume(env, "worklist", topic) == 1
    await produce(env, "worklist", "acks", enable_idempotence=True)
    await produce(env, "worklist", "audit.in.worklist", enable_idempotence=True)  # its intake
    for topic in ("instances", "series", "volumes", "findings", "audit"):
        await denied(consume(env, "worklist", topic), TopicAuthorizationFailedError)
    for topic in ("alerts", "results", "findings", "audit"):
        await denied(produce(env, "worklist", topic), TopicAuthorizationFailedError)


async def test_operator_reads_but_does_not_write(env: Env) -> None:
    await seed(env, "deadletter")
    assert await consume(env, "operator", "deadletter", group="operator") == 1
    assert await consume(env, "operator", "deadletter") == 1
    await denied(produce(env, "operator", "instances"), TopicAuthorizationFailedError)


async def test_operator_cannot_read_raw_instances_or_write_findings(env: Env) -> None:
    """The attack (issue 14, low): an operator's credential reads the raw DICOM on
    ``instances`` and forges findings (alerts without analysis). Both are refused; what the
    operator needs stays: replays write ``series`` / ``volumes``, it reads findings."""
    await seed(env, "instances")
    await seed(env, "findings")
    await denied(consume(env, "operator", "instances"), TopicAuthorizationFailedError)
    await denied(produce(env, "operator", "findings"), TopicAuthorizationFailedError)
    await denied(produce(env, "operator", "alerts"), TopicAuthorizationFailedError)
    assert await consume(env, "operator", "findings") == 1
    await produce(env, "operator", "series")
    await produce(env, "operator", "volumes")


async def test_unauthenticated_and_plaintext_clients_are_refused(env: Env) -> None:
    settings = env.broker.settings_for("operator")
    base = {"bootstrap_servers": settings.bootstrap_servers, "request_timeout_ms": 5000}
    ctx = create_ssl_context(cafile=str(settings.ca_file))

    async def connect(**kw: Any) -> None:
        consumer = AIOKafkaConsumer(**base, **kw)
        try:
            await consumer.start()
            await consumer.topics()
        finally:
            await consumer.stop()

    # TLS but no credentials
    await denied(connect(security_protocol="SSL", ssl_context=ctx), KafkaError)
    # credentials but no TLS
    await denied(
        connect(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="operator",
            sasl_plain_password=settings.password.get_secret_value(),
        ),
        KafkaError,
    )
    # wrong password
    await denied(
        connect(
            security_protocol="SASL_SSL",
            ssl_context=ctx,
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="operator",
            sasl_plain_password="not-the-password",
        ),
        SaslAuthenticationFailed,
        KafkaConnectionError,
    )
    # a broker certificate not signed by a CA we trust
    untrusted = ssl.create_default_context()
    await denied(
        connect(
            security_protocol="SASL_SSL",
            ssl_context=untrusted,
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="operator",
            sasl_plain_password=settings.password.get_secret_value(),
        ),
        KafkaError,
    )


async def test_a_rotated_scram_password_replaces_the_old_one_and_never_travels_in_env(
    env: Env,
) -> None:
    """``radstream keys rotate-password``: the broker takes the new password (through a 0600
    file, not a command line), the old one is refused from then on, and what a service process
    gets is a mode-checked file name, never the password itself."""
    from shared.security.kafka import client_kwargs

    principal = "auditor"  # a party no other test of this session authenticates as
    old = env.broker.credentials()[principal]
    new = "rotated-" + old[::-1]
    env.broker.set_password(principal, new)
    service_env = env.broker.env_for(principal)
    assert not any(old in v or new in v for v in service_env.values())
    password_file = service_env["RADSTREAM_KAFKA__PASSWORD_FILE"]
    assert oct(os.stat(password_file).st_mode & 0o777) == "0o600"
    assert not list(env.broker.secrets_dir.glob(".args-*"))  # the argument file is gone

    settings = env.broker.settings_for(principal)
    ctx = create_ssl_context(cafile=str(settings.ca_file))

    async def topics(password: str) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            request_timeout_ms=5000,
            security_protocol="SASL_SSL",
            ssl_context=ctx,
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=principal,
            sasl_plain_password=password,
        )
        try:
            await consumer.start()
            await consumer.topics()
        finally:
            await consumer.stop()

    # the change reaches the broker through the controller's metadata log: wait for it
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            await topics(new)
            break
        except (SaslAuthenticationFailed, KafkaConnectionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    await denied(topics(old), SaslAuthenticationFailed, KafkaConnectionError)
    # a service reading its password file gets the new one
    from shared.config import KafkaSettings

    from_file = KafkaSettings(
        bootstrap_servers=settings.bootstrap_servers,
        username=principal,
        password_file=password_file,
        ca_file=settings.ca_file,
    )
    assert client_kwargs(from_file)["sasl_plain_password"] == new

"""Writing audit events from outside a stage (CLI reads, replays, key operations, the gateway):
to the principal's own intake topic, from where the sequencer chains them."""

from __future__ import annotations

from typing import Literal

from aiokafka import AIOKafkaProducer

from shared.config import Settings
from shared.runtime.codec import Codec
from shared.schemas import AuditEvent
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs


async def emit_audit(
    settings: Settings,
    keyring: Keyring,
    action: str,
    resource: str,
    outcome: Literal["success", "denied", "error"] = "success",
    *,
    key: bytes = b"audit",
) -> None:
    """One audit event as ``settings.kafka.username`` (never a UID in ``resource``: a keyed
    hash or a topic name)."""
    topic = settings.audit_topic()
    event = AuditEvent(
        actor=settings.kafka.username, action=action[:64], resource=resource[:256], outcome=outcome
    )
    value, headers = Codec(keyring).encode(topic, key, event)
    producer = AIOKafkaProducer(
        acks="all", enable_idempotence=True, **client_kwargs(settings.kafka)
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

"""Webhook channel: the alert as JSON, POSTed with an HMAC-SHA256 signature over timestamp +
body (:mod:`shared.security.webhook`, which receivers use to verify) and the alert id as the
idempotency key."""

from __future__ import annotations

import json

from services.notify.targets import WebhookTarget
from services.notify.transport import post
from shared.schemas import Alert
from shared.security.webhook import IDEMPOTENCY_HEADER, sign

EVENT = "radstream.alert"


def body(alert: Alert) -> bytes:
    """The JSON body: the same bytes for the same alert, every attempt."""
    doc = {"event": EVENT, "alert": alert.model_dump(mode="json")}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def headers(target: WebhookTarget, alert: Alert, payload: bytes, now: float) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "radstream-notify/1",
        IDEMPOTENCY_HEADER: alert.alert_id,
        **sign(target.keys(), payload, now),
    }


def deliver(target: WebhookTarget, alert: Alert, *, timeout_s: float, now: float) -> None:
    payload = body(alert)
    post(
        target.url,
        payload,
        headers(target, alert, payload, now),
        timeout_s=timeout_s,
        ca_file=target.ca_file,
    )

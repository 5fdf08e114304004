"""Webhook signatures: HMAC-SHA256 over ``timestamp + "." + body``, for senders and receivers.

RadStream signs every webhook it sends (``services/notify``); a receiver checks it with
:func:`verify` before trusting the body::

    from shared.security.webhook import verify, TIMESTAMP_HEADER, SIGNATURE_HEADER
    ok = verify(secret, request.headers[TIMESTAMP_HEADER], request.headers[SIGNATURE_HEADER],
                raw_body)

The signature header is ``v1=<hex>`` (several, comma-separated, while a key rotates: any one
that matches is enough). The timestamp is Unix seconds; a request older (or newer) than
``tolerance_s`` is refused, so a captured request cannot be replayed later. The alert id
travels as ``Idempotency-Key``: a receiver that already has it answers 2xx and ignores the
repeat (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-RadStream-Timestamp"
SIGNATURE_HEADER = "X-RadStream-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SCHEME = "v1"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def sign(secret: bytes | list[bytes], body: bytes, now: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers for ``body`` sent at ``now``; with several keys
    (a rotation: the new and the old), one ``v1=`` signature per key, comma-separated."""
    ts = str(int(time.time() if now is None else now))
    keys = [secret] if isinstance(secret, bytes) else secret
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: ",".join(signature(k, ts, body) for k in keys)}


def verify(
    secret: bytes,
    timestamp: str | None,
    signature_header: str | None,
    body: bytes,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """True if one ``v1=`` signature in ``signature_header`` is the HMAC of ``timestamp`` and
    ``body`` under ``secret`` and the timestamp is within ``tolerance_s`` of ``now``.
    Constant-time comparison; any malformed input is simply not valid."""
    if not timestamp or not signature_header or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body)
    return any(
        hmac.compare_digest(expected.encode(), part.strip().encode())
        for part in signature_header.split(",")
    )

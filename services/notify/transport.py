"""The wire: one HTTP POST, one MLLP exchange. Blocking (the stage runs handlers in threads),
bounded by a timeout, no redirects followed, answers read up to a cap. Errors come back as
:class:`DeliveryFailed`: retriable (the endpoint may take it later) or not; their messages
name the target and what went wrong, never the payload."""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MAX_ANSWER_BYTES = 1024 * 1024
MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"


class DeliveryFailed(Exception):
    """One attempt at one target failed. ``retriable``: a later attempt may succeed."""

    def __init__(self, retriable: bool, message: str) -> None:
        self.retriable = retriable
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


RETRIABLE_STATUS = frozenset({408, 425, 429})


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_s: float,
    ca_file: Path | None = None,
) -> Answer:
    """POST ``body``; a 2xx answer is returned, anything else raises :class:`DeliveryFailed`
    (5xx, 408, 425, 429 and network errors retriable; other statuses not)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryFailed(False, f"not an http(s) URL (scheme {parts.scheme!r})")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout_s, context=tls_context(ca_file)
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        answer = Answer(response.status, response.read(MAX_ANSWER_BYTES))
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryFailed(True, f"{type(exc).__name__} talking to {parts.hostname}") from None
    finally:
        conn.close()
    if 200 <= answer.status < 300:
        return answer
    retriable = answer.status >= 500 or answer.status in RETRIABLE_STATUS
    raise DeliveryFailed(retriable, f"HTTP {answer.status} from {parts.hostname}")


def _exchange(sock: socket.socket, message: bytes, host: str) -> bytes:
    sock.sendall(MLLP_START + message + MLLP_END)
    received = b""
    while not received.endswith(MLLP_END):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
        if len(received) > MAX_ANSWER_BYTES:
            raise DeliveryFailed(True, f"MLLP answer from {host} exceeds the cap")
    return received


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying client context: the CA bundle given, else the system's."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def mllp_exchange(
    host: str,
    port: int,
    message: bytes,
    *,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> bytes:
    """Send one MLLP-framed message (inside TLS if ``tls``) and return the framed answer's
    content (the ACK)."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        except BaseException:
            raw.close()
            raise
        with sock:
            received = _exchange(sock, message, host)
    except OSError as exc:  # ssl.SSLError included: a failed handshake is retried
        raise DeliveryFailed(True, f"{type(exc).__name__} talking MLLP to {host}") from None
    start = received.find(MLLP_START)
    if start < 0 or not received.endswith(MLLP_END):
        raise DeliveryFailed(True, f"no complete MLLP frame back from {host}")
    return received[start + 1 : -len(MLLP_END)]

"""Real local peers for the notification channels, started by the tests on 127.0.0.1:

* :class:`WebhookReceiver`: an HTTP server that verifies the signature with the helper that
  receivers use (``shared.security.webhook.verify``), can fail the first N attempts of each
  alert id (503) or every attempt, and counts the deliveries it accepted per idempotency key
  (no server-side de-duplication: a repeat would show as a count of 2);
* :class:`FhirServer`: an HTTP server that parses every POSTed body as a FHIR Bundle with
  ``fhir.resources`` and answers a transaction-response (400 + OperationOutcome if invalid);
* :class:`MllpPeer`: hl7apy's own MLLP server (not ours) with a handler that parses the
  ORU^R01 and answers an ACK with the configured code.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from pydantic import ValidationError

from shared.security.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify,
)


class _Http:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer, ctype = peer.handle(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class WebhookReceiver(_Http):
    def __init__(self, secret: bytes, *, fail_first: int = 0, always_fail: bool = False) -> None:
        super().__init__()
        self.secret = secret
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.attempts: Counter[str] = Counter()  # per idempotency key, every POST
        self.delivered: Counter[str] = Counter()  # per idempotency key, accepted with 2xx
        self.bodies: dict[str, dict[str, Any]] = {}
        self.bad_signatures = 0

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        key = headers.get(IDEMPOTENCY_HEADER, "")
        with self.lock:
            if not verify(
                self.secret, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER), body
            ):
                self.bad_signatures += 1
                return 401, b'{"error":"bad signature"}', "application/json"
            self.attempts[key] += 1
            if self.always_fail or self.attempts[key] <= self.fail_first:
                return 503, b'{"error":"try later"}', "application/json"
            self.delivered[key] += 1
            self.bodies[key] = json.loads(body)
        return 200, b'{"ok":true}', "application/json"


class FhirServer(_Http):
    def __init__(self) -> None:
        super().__init__()
        self.bundles: list[Bundle] = []
        self.invalid = 0
        self.authorization: list[str | None] = []

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        try:
            bundle = Bundle.model_validate_json(body)
        except ValidationError as exc:
            with self.lock:
                self.invalid += 1
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": str(exc)[:200]}],
            }
            return 400, json.dumps(outcome).encode(), "application/fhir+json"
        with self.lock:
            self.bundles.append(bundle)
            self.authorization.append(headers.get("Authorization"))
        response = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}} for _ in (bundle.entry or [])],
        }
        return 200, json.dumps(response).encode(), "application/fhir+json"


class MllpPeer:
    """hl7apy's MLLPServer answering every ORU^R01 with an ACK of code ``ack_code``."""

    def __init__(self, ack_code: str = "AA") -> None:
        self.received: list[Message] = []
        self.lock = threading.Lock()
        peer = self

        class OruHandler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                msg = parse_message(self.incoming_message)
                with peer.lock:
                    peer.received.append(msg)
                ack = Message("ACK", version="2.5")
                ack.msh.msh_3 = "IE"
                ack.msh.msh_4 = "HOSPITAL"
                ack.msh.msh_5 = msg.msh.msh_3.value
                ack.msh.msh_6 = msg.msh.msh_4.value
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = "ACK" + msg.msh.msh_10.value[:17]
                ack.msh.msh_11 = "P"
                ack.msa.msa_1 = ack_code
                ack.msa.msa_2 = msg.msh.msh_10.value
                return "\x0b" + str(ack.to_er7()) + "\x1c\r"

        handlers = {t: (OruHandler,) for t in ("ORU^R01^ORU_R01", "ORU^R01")}
        self.server = MLLPServer("127.0.0.1", 0, handlers, timeout=5)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> MllpPeer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

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

import datetime
import ipaddress
import json
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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


def write_secret(path: Path, value: bytes) -> Path:
    """A secret file as an operator would leave it: readable by its owner only."""
    path.write_bytes(value + b"\n")
    path.chmod(0o600)
    return path


def tls_server(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A throw-away CA (its PEM path, for the client's ``ca_file``) and a server context whose
    certificate it signed for 127.0.0.1."""

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("notify test CA"))
        .issuer_name(name("notify test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return ca_path, context


class _Http:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/"

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
    def __init__(
        self,
        secret: bytes,
        *,
        fail_first: int = 0,
        always_fail: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(tls)
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

    def __init__(self, ack_code: str = "AA", tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
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

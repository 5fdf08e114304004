"""Key-encryption-key providers: who uses a purpose's private key to unwrap a data key.

* :class:`FileKek` — the private keys in the principal's own key file (the default).
* :class:`KmsKek` — a KMS keeps every private key; the principal's key file holds public keys
  only, and each unwrap is a request to the KMS, which authenticates the principal (a token
  only it holds) and opens only the purposes its role may read (the same policy as the key
  files: :mod:`shared.stack.principals`). :class:`KmsServer` is that KMS: served on a Unix
  socket by ``python -m shared.security.kek serve`` (a local stand-in for a cloud KMS or an
  HSM), or called in memory by :class:`InMemoryKms` in tests — the same code either way.

Protocol (one JSON object per line, both ways)::

    {"op": "unwrap", "principal", "token", "purpose", "kid", "ephemeral", "wrapped"}
        → {"ok": true, "dek": "<b64>"} | {"ok": false, "error": "<code>"}
    {"op": "purposes", "principal", "token"} → {"ok": true, "purposes": [...]}

Error codes: ``auth`` (unknown principal or wrong token), ``denied`` (its role may not open
that purpose), ``unknown_key``, ``integrity``, ``bad_request``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from shared.config import Settings
from shared.security.envelope import (
    EnvelopeError,
    IntegrityError,
    KeyMaterial,
    KeyPair,
    Keyring,
    PrivateKeys,
    UnknownKeyError,
    unwrap_with_private,
)
from shared.security.keyfile import read_key_file, read_secret_file, write_private

log = logging.getLogger("radstream.kms")


FileKek = PrivateKeys  # unwraps with the private keys of the key file itself


# ---- the KMS ----------------------------------------------------------------------------------
def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class KmsServer:
    """Keeps the master keyring; unwraps for authenticated principals, within their role."""

    master_path: Path
    tokens: Mapping[str, str]  # principal → SHA-256 of its token
    policy: Mapping[str, frozenset[str]]  # principal → purposes it may open
    _material: KeyMaterial | None = field(default=None, init=False)
    _mtime: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    denials: int = field(default=0, init=False)

    @classmethod
    def for_roles(cls, master_path: Path, tokens: Mapping[str, str]) -> KmsServer:
        from shared.stack.principals import ROLES

        return cls(master_path, tokens, {name: role.opens for name, role in ROLES.items()})

    def _master(self) -> KeyMaterial:
        with self._lock:
            mtime = self.master_path.stat().st_mtime_ns
            if self._material is None or mtime != self._mtime:
                self._material = read_key_file(self.master_path)
                self._mtime = mtime
            return self._material

    def handle(self, req: Mapping[str, Any]) -> dict[str, Any]:
        principal = str(req.get("principal", ""))
        expected = self.tokens.get(principal)
        given = token_digest(str(req.get("token", "")))
        if expected is None or not hmac.compare_digest(expected, given):
            self.denials += 1
            log.warning("kms: authentication failed for a request (principal %r)", principal)
            return {"ok": False, "error": "auth"}
        allowed = self.policy.get(principal, frozenset())
        op = req.get("op")
        if op == "purposes":
            return {"ok": True, "purposes": sorted(allowed)}
        if op != "unwrap":
            return {"ok": False, "error": "bad_request"}
        purpose, kid = str(req.get("purpose", "")), str(req.get("kid", ""))
        if purpose not in allowed:
            self.denials += 1
            log.warning("kms: %s may not open purpose %s (key %s)", principal, purpose, kid)
            return {"ok": False, "error": "denied"}
        master = self._master()
        pk = master.purposes.get(purpose)
        pair = pk.keys.get(kid) if pk else None
        if pair is None:
            return {"ok": False, "error": "unknown_key"}
        try:
            ephemeral = base64.b64decode(str(req["ephemeral"]), validate=True)
            wrapped = base64.b64decode(str(req["wrapped"]), validate=True)
            dek = unwrap_with_private(kid, pair, ephemeral, wrapped)
        except (KeyError, ValueError):
            return {"ok": False, "error": "bad_request"}
        except EnvelopeError:
            return {"ok": False, "error": "integrity"}
        return {"ok": True, "dek": base64.b64encode(dek).decode()}


def _raise_for(answer: Mapping[str, Any], purpose: str, kid: str) -> None:
    error = answer.get("error")
    if error == "integrity":
        raise IntegrityError("authentication failed: wrapped data key altered (KMS)")
    if error == "denied":
        raise UnknownKeyError(f"the KMS refuses to open purpose {purpose!r} for this principal")
    if error == "unknown_key":
        raise UnknownKeyError(f"key id {kid!r} is not in the KMS")
    raise UnknownKeyError(f"the KMS refused the request ({error})")


class KmsTransport(Protocol):
    """How requests reach the KMS: in memory, or a Unix socket."""

    def call(self, req: dict[str, Any]) -> dict[str, Any]: ...


class KmsKek:
    """Unwraps through a KMS (see the module doc); holds no private key itself."""

    def __init__(self, transport: KmsTransport, principal: str, token: str) -> None:
        self._transport = transport
        self._principal = principal
        self._token = token

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._transport.call({**req, "principal": self._principal, "token": self._token})

    def unwrap(
        self, purpose: str, kid: str, pair: KeyPair, ephemeral: bytes, wrapped: bytes
    ) -> bytes:
        del pair
        answer = self._call(
            {
                "op": "unwrap",
                "purpose": purpose,
                "kid": kid,
                "ephemeral": base64.b64encode(ephemeral).decode(),
                "wrapped": base64.b64encode(wrapped).decode(),
            }
        )
        if not answer.get("ok"):
            _raise_for(answer, purpose, kid)
        return base64.b64decode(str(answer["dek"]))

    def purposes(self) -> list[str]:
        answer = self._call({"op": "purposes"})
        if not answer.get("ok"):
            _raise_for(answer, "", "")
        return [str(p) for p in answer["purposes"]]


class InMemoryKms:
    """The KMS in this process (tests): requests go through the same JSON encoding."""

    def __init__(self, server: KmsServer) -> None:
        self.server = server

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        answer = self.server.handle(json.loads(json.dumps(req)))
        return dict(json.loads(json.dumps(answer)))


class UnixSocketKms:
    """A KMS process on a Unix socket; one connection, re-opened when it breaks."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        sock.connect(str(self.path))
        self._sock, self._file = sock, sock.makefile("rwb")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._file.close()
                self._sock.close()
                self._sock = self._file = None

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(req).encode() + b"\n"
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._connect()
                    self._file.write(line)
                    self._file.flush()
                    answer = self._file.readline()
                    if not answer:
                        raise ConnectionError("the KMS closed the connection")
                    return dict(json.loads(answer))
                except OSError:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = self._file = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")


class _Handler(socketserver.StreamRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        for line in self.rfile:
            try:
                req = json.loads(line)
                answer = self.server.kms.handle(req if isinstance(req, dict) else {})
            except ValueError:
                answer = {"ok": False, "error": "bad_request"}
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, kms: KmsServer) -> None:
        self.kms = kms
        super().__init__(str(path), _Handler)


def serve_unix(kms: KmsServer, path: Path) -> _UnixServer:
    """Serve ``kms`` on a Unix socket (0600) in a background thread; ``shutdown()`` stops it."""
    path.unlink(missing_ok=True)
    server = _UnixServer(path, kms)
    path.chmod(0o600)
    threading.Thread(target=server.serve_forever, name="kms", daemon=True).start()
    return server


# ---- tokens and wiring ------------------------------------------------------------------------
TOKEN_FILE = "kms.token"  # noqa: S105 - a file name


def issue_tokens(root: Path, principals: list[str]) -> dict[str, str]:
    """A fresh random token per principal in ``root/<principal>/kms.token`` (0600); returns
    principal → token digest (what the KMS keeps). Existing tokens are kept."""
    import secrets

    digests = {}
    for principal in principals:
        path = root / principal / TOKEN_FILE
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32))
        digests[principal] = token_digest(read_secret_file(path))
    return digests


KekKind = Literal["file", "kms"]


def load_keyring(
    path: Path,
    kind: KekKind = "file",
    *,
    principal: str = "",
    kms_socket: Path | None = None,
    kms_token_file: Path | None = None,
) -> Keyring:
    """A principal's keyring from its key file, opening through its own private keys or, with
    ``kind="kms"``, through the KMS at ``kms_socket`` (authenticated by ``kms_token_file``)."""
    if kind == "file":
        return Keyring.from_file(path, FileKek())
    if kms_socket is None or kms_token_file is None or not principal:
        raise UnknownKeyError("the KMS provider needs a socket, a token file and a principal")
    kek = KmsKek(UnixSocketKms(kms_socket), principal, read_secret_file(kms_token_file))
    return Keyring.from_file(path, kek)


def keyring_for(settings: Settings) -> Keyring:
    """The keyring a service or CLI command runs with, as its settings say."""
    return load_keyring(
        settings.keyring_path,
        settings.kek,
        principal=settings.kafka.username,
        kms_socket=settings.kms_socket,
        kms_token_file=settings.kms_token_file,
    )


def main(argv: list[str]) -> int:
    """``python -m shared.security.kek serve MASTER TOKENS_JSON SOCKET``: the stand-in KMS."""
    if len(argv) != 4 or argv[0] != "serve":
        print("usage: python -m shared.security.kek serve MASTER TOKENS_JSON SOCKET")
        return 2
    logging.basicConfig(level=logging.INFO)
    tokens = json.loads(Path(argv[2]).read_text())
    server = serve_unix(KmsServer.for_roles(Path(argv[1]), tokens), Path(argv[3]))
    log.info("kms: serving on %s", argv[3])
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

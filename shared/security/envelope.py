"""AES-256-GCM envelope encryption with a rotating keyring.

Each sealed object gets a fresh 256-bit data key (DEK); the DEK is wrapped (RFC 3394 AES key
wrap) by the keyring's active key-encryption key (KEK), whose id travels in the clear header.
Associated data binds the ciphertext to its context (topic, message key, schema version) and
to the header itself, so moving a ciphertext elsewhere or editing any header byte fails
authentication.

Wire layout::

    b"RSE1" | kid_len:u8 | kid | wrapped_dek:40 | nonce:12 | ciphertext+tag
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

MAGIC = b"RSE1"
_WRAPPED_LEN = 40
_NONCE_LEN = 12


class EnvelopeError(Exception):
    """Base class; ``reason`` is the dead-letter reason code."""

    reason = "integrity"


class IntegrityError(EnvelopeError):
    """Ciphertext, header or associated data were altered, or the envelope is malformed."""

    reason = "integrity"


class UnknownKeyError(EnvelopeError):
    """The envelope names a key id that this keyring does not hold."""

    reason = "unknown_key"


@dataclass(frozen=True)
class KeyringData:
    active: str
    keys: dict[str, bytes]
    hmac_key: bytes


def new_key_id() -> str:
    return time.strftime("k%Y%m%d-", time.gmtime()) + secrets.token_hex(4)


def _encode(data: KeyringData) -> str:
    return json.dumps(
        {
            "version": 1,
            "active": data.active,
            "keys": {k: base64.b64encode(v).decode() for k, v in data.keys.items()},
            "hmac_key": base64.b64encode(data.hmac_key).decode(),
        },
        indent=2,
    )


def _decode(text: str) -> KeyringData:
    raw = json.loads(text)
    keys = {k: base64.b64decode(v) for k, v in raw["keys"].items()}
    if raw["active"] not in keys or any(len(k) != 32 for k in keys.values()):
        raise ValueError("keyring: active key missing or a key is not 256 bits")
    return KeyringData(active=raw["active"], keys=keys, hmac_key=base64.b64decode(raw["hmac_key"]))


def write_keyring_file(path: Path, data: KeyringData) -> None:
    """Atomically write a keyring file readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_encode(data))
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def init_keyring_file(path: Path) -> KeyringData:
    """Create a keyring with one active key and an HMAC key; keeps an existing one."""
    if path.exists():
        return _decode(path.read_text())
    kid = new_key_id()
    data = KeyringData(active=kid, keys={kid: AESGCM.generate_key(256)}, hmac_key=os.urandom(32))
    write_keyring_file(path, data)
    return data


def rotate_keyring_file(path: Path) -> str:
    """Add a new active key; old keys stay for decryption. Returns the new key id."""
    data = _decode(path.read_text())
    kid = new_key_id()
    keys = dict(data.keys)
    keys[kid] = AESGCM.generate_key(256)
    write_keyring_file(path, KeyringData(active=kid, keys=keys, hmac_key=data.hmac_key))
    return kid


class Keyring:
    """Key-encryption keys by id, the active one for sealing, and the HMAC key for Kafka keys.

    Backed by a file when loaded with :meth:`from_file`: a rotation written by
    ``radstream keys rotate`` is picked up without restart (the file is re-read when its
    mtime changes, checked at most once a second, and at once when an unknown key id is met).
    """

    def __init__(self, data: KeyringData, path: Path | None = None) -> None:
        self._data = data
        self._path = path
        self._mtime = path.stat().st_mtime_ns if path else 0
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        return cls(_decode(path.read_text()), path)

    @classmethod
    def generate(cls) -> Keyring:
        kid = new_key_id()
        return cls(KeyringData(kid, {kid: AESGCM.generate_key(256)}, os.urandom(32)))

    @property
    def active_key_id(self) -> str:
        self._maybe_reload()
        return self._data.active

    @property
    def key_ids(self) -> list[str]:
        return list(self._data.keys)

    def _maybe_reload(self, force: bool = False) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            try:
                mtime = self._path.stat().st_mtime_ns
            except FileNotFoundError:
                return
            if mtime != self._mtime:
                self._data = _decode(self._path.read_text())
                self._mtime = mtime

    def keyed_hash(self, value: str) -> bytes:
        """HMAC-SHA256 of an identifier: stable partitioning key, no UID in clear on the wire."""
        digest = hmac.new(self._data.hmac_key, value.encode(), hashlib.sha256).hexdigest()
        return digest[:32].encode()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self._maybe_reload()
        data = self._data  # one snapshot: a reload in another thread cannot split kid and key
        kid = data.active.encode()
        dek = AESGCM.generate_key(256)
        wrapped = aes_key_wrap(data.keys[data.active], dek)
        nonce = os.urandom(_NONCE_LEN)
        header = MAGIC + bytes([len(kid)]) + kid + wrapped + nonce
        return header + AESGCM(dek).encrypt(nonce, plaintext, header + aad)

    def open(self, envelope: bytes, aad: bytes) -> bytes:
        if len(envelope) < len(MAGIC) + 1 or envelope[:4] != MAGIC:
            raise IntegrityError("not a RadStream envelope (bad magic)")
        klen = envelope[4]
        hlen = 5 + klen + _WRAPPED_LEN + _NONCE_LEN
        if len(envelope) < hlen + 16:
            raise IntegrityError("envelope truncated")
        try:
            kid = envelope[5 : 5 + klen].decode("ascii")
        except UnicodeDecodeError as exc:
            raise IntegrityError("envelope key id is not ASCII") from exc
        keys = self._data.keys
        if kid not in keys:
            self._maybe_reload(force=True)
            keys = self._data.keys
            if kid not in keys:
                raise UnknownKeyError(f"key id {kid!r} is not in the keyring")
        wrapped = envelope[5 + klen : 5 + klen + _WRAPPED_LEN]
        nonce = envelope[hlen - _NONCE_LEN : hlen]
        try:
            dek = aes_key_unwrap(keys[kid], wrapped)
            return AESGCM(dek).decrypt(nonce, envelope[hlen:], envelope[:hlen] + aad)
        except (InvalidTag, InvalidUnwrap) as exc:
            raise IntegrityError("authentication failed: ciphertext or context altered") from exc

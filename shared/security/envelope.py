"""AES-256-GCM envelope encryption with per-purpose key pairs.

Every sealed object gets a fresh 256-bit data key (DEK). The DEK is wrapped for the *purpose*
the object belongs to (``instances``, ``series``, ``volumes``, ``findings``, ``alerts``,
``deadletter``, ``audit``: see :data:`shared.topology.PURPOSES`): an ephemeral X25519 key
agreement with the purpose's active public key, HKDF-SHA256, then RFC 3394 AES key wrap. So

* sealing needs only the purpose's **public** key: a scanner, the gateway or a stage that
  writes dead letters can seal records it can never open again;
* opening needs the purpose's **private** key (the key-encryption key), which only the
  principals that read that purpose hold, or which a KMS keeps and uses on their behalf
  (:mod:`shared.security.kek`).

Associated data binds the ciphertext to its context (topic, message key, schema version) and
to the format, so moving a ciphertext elsewhere fails authentication. The key block (key id,
ephemeral key, wrapped data key) is authenticated by the key wrap itself (its integrity check,
with the key id and both public keys in the HKDF info): editing it fails to unwrap, and a
different data key fails the GCM tag. That makes a key rotation's *re-wrap* cheap and blind:
:meth:`Keyring.rewrap` replaces the key block for the purpose's new active key and keeps nonce
and ciphertext, without knowing the associated data or ever decrypting the content.

Wire layout (``RSE2``)::

    b"RSE2" | kid_len:u8 | kid | ephemeral_public:32 | wrapped_dek:40 | nonce:12 | ciphertext+tag

``RSE1`` envelopes (one symmetric key-encryption key for everything, before keys per purpose)
are still opened with the *legacy* keys a migrated keyring keeps until they are retired.

The keyring also holds the HMAC keys that make Kafka keys (keyed hashes of series UIDs, one
active, older ones still recognised) and the key that names blobs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

MAGIC = b"RSE2"
LEGACY_MAGIC = b"RSE1"
_EPHEMERAL_LEN = 32
_WRAPPED_LEN = 40
_NONCE_LEN = 12
_INFO = b"radstream/kek/v2"


class EnvelopeError(Exception):
    """Base class; ``reason`` is the dead-letter reason code."""

    reason = "integrity"


class IntegrityError(EnvelopeError):
    """Ciphertext, header or associated data were altered, or the envelope is malformed."""

    reason = "integrity"


class UnknownKeyError(EnvelopeError):
    """The envelope names a key id this keyring does not hold, or one whose purpose this
    principal may not open (it holds the public half only, or the KMS refuses)."""

    reason = "unknown_key"


class KeyFileError(Exception):
    """A key file is missing, malformed or readable by others than its owner."""


@dataclass(frozen=True)
class KeyPair:
    """One key pair of a purpose. ``private`` is None where this holder may only seal."""

    public: bytes
    private: bytes | None = None

    @staticmethod
    def generate() -> KeyPair:
        private = X25519PrivateKey.generate()
        return KeyPair(private.public_key().public_bytes_raw(), private.private_bytes_raw())

    def public_only(self) -> KeyPair:
        return KeyPair(self.public)


@dataclass(frozen=True)
class PurposeKeys:
    """The key pairs of one purpose by key id; ``active`` seals, every one may open."""

    active: str
    keys: dict[str, KeyPair]


@dataclass(frozen=True)
class KeyMaterial:
    """What a key file holds: the master keyring (every private key), or one principal's
    share of it (``principal`` set; see :func:`shared.security.keyfile.issue`)."""

    purposes: dict[str, PurposeKeys]
    hmac_active: str | None = None
    hmac_keys: dict[str, bytes] | None = None
    blob_name_key: bytes | None = None
    legacy: dict[str, bytes] | None = None  # RSE1 key-encryption keys: open only
    retired: tuple[str, ...] = ()
    principal: str | None = None

    def find(self, kid: str) -> tuple[str, KeyPair] | None:
        """The purpose and key pair of ``kid``, if held."""
        for purpose, pk in self.purposes.items():
            pair = pk.keys.get(kid)
            if pair is not None:
                return purpose, pair
        return None


class KekProvider(Protocol):
    """Who performs the private-key half of opening: a key file's private keys
    (:class:`shared.security.kek.FileKek`) or a KMS that keeps them
    (:class:`shared.security.kek.KmsKek`)."""

    def unwrap(
        self, purpose: str, kid: str, pair: KeyPair, ephemeral: bytes, wrapped: bytes
    ) -> bytes:
        """The data key wrapped for ``kid``; UnknownKeyError if this principal may not open
        ``purpose``, IntegrityError if the wrapped key does not authenticate."""
        ...


def new_key_id(prefix: str) -> str:
    return f"{prefix}-" + time.strftime("%Y%m%d-", time.gmtime()) + os.urandom(4).hex()


def wrap_key(kid: str, ephemeral: bytes, recipient: bytes, shared: bytes) -> bytes:
    """The AES key-wrap key of one envelope: HKDF over the X25519 shared secret, bound to the
    key id and both public keys."""
    info = b"\x00".join((_INFO, kid.encode(), ephemeral, recipient))
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def unwrap_with_private(kid: str, pair: KeyPair, ephemeral: bytes, wrapped: bytes) -> bytes:
    """The private-key half of opening (what a KMS does on its side)."""
    if pair.private is None:
        raise UnknownKeyError(f"key {kid!r}: public half only (this principal may only seal)")
    private = X25519PrivateKey.from_private_bytes(pair.private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError as exc:  # an all-zero shared secret: a forged ephemeral key
        raise IntegrityError("envelope ephemeral key is invalid") from exc
    try:
        return aes_key_unwrap(wrap_key(kid, ephemeral, pair.public, shared), wrapped)
    except InvalidUnwrap as exc:
        raise IntegrityError("authentication failed: wrapped data key altered") from exc


class PrivateKeys:
    """The default provider: the private keys in the keyring's own material (a key file)."""

    def unwrap(
        self, purpose: str, kid: str, pair: KeyPair, ephemeral: bytes, wrapped: bytes
    ) -> bytes:
        del purpose
        return unwrap_with_private(kid, pair, ephemeral, wrapped)


def parse_header(envelope: bytes) -> tuple[bytes, str, int]:
    """(magic, key id, header length) of an envelope; IntegrityError if malformed."""
    if len(envelope) < 5 or envelope[:4] not in (MAGIC, LEGACY_MAGIC):
        raise IntegrityError("not a RadStream envelope (bad magic)")
    klen = envelope[4]
    extra = _EPHEMERAL_LEN if envelope[:4] == MAGIC else 0
    hlen = 5 + klen + extra + _WRAPPED_LEN + _NONCE_LEN
    if len(envelope) < hlen + 16:
        raise IntegrityError("envelope truncated")
    try:
        kid = envelope[5 : 5 + klen].decode("ascii")
    except UnicodeDecodeError as exc:
        raise IntegrityError("envelope key id is not ASCII") from exc
    return envelope[:4], kid, hlen


class Keyring:
    """A principal's keys: per purpose the active public key (to seal) and the private keys
    it may open with (or a KMS that opens for it), the HMAC keys for Kafka keys and the blob
    naming key.

    Backed by a file when loaded with :meth:`from_file`: a rotation written by
    ``radstream keys rotate`` is picked up without restart (the file is re-read when its
    mtime changes, checked at most once a second, and at once when an unknown key id is met).
    """

    def __init__(
        self,
        material: KeyMaterial,
        path: Path | None = None,
        kek: KekProvider | None = None,
    ) -> None:
        self._data = material
        self._path = path
        self._kek: KekProvider = kek or PrivateKeys()
        self._mtime = path.stat().st_mtime_ns if path else 0
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, kek: KekProvider | None = None) -> Keyring:
        from shared.security.keyfile import read_key_file

        return cls(read_key_file(path), path, kek)

    @classmethod
    def generate(cls) -> Keyring:
        """A master keyring in memory (every purpose, both halves): tests and benchmarks."""
        from shared.security.keyfile import new_master

        return cls(new_master())

    # ---- what it holds --------------------------------------------------------------------
    @property
    def material(self) -> KeyMaterial:
        return self._data

    @property
    def principal(self) -> str | None:
        return self._data.principal

    def active_key_id(self, purpose: str) -> str:
        self._maybe_reload()
        pk = self._data.purposes.get(purpose)
        if pk is None:
            raise UnknownKeyError(f"no key for purpose {purpose!r} in this keyring")
        return pk.active

    @property
    def key_ids(self) -> list[str]:
        return [kid for pk in self._data.purposes.values() for kid in pk.keys]

    def can_open(self, purpose: str) -> bool:
        """Does this keyring hold a private key of ``purpose`` (or a KMS that may use one)?"""
        pk = self._data.purposes.get(purpose)
        if pk is None:
            return False
        if isinstance(self._kek, PrivateKeys):
            return any(p.private is not None for p in pk.keys.values())
        allowed = getattr(self._kek, "purposes", None)  # a KMS says what it opens for us
        return allowed is not None and purpose in allowed()

    def can_seal(self, purpose: str) -> bool:
        return purpose in self._data.purposes

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
                from shared.security.keyfile import read_key_file

                self._data = read_key_file(self._path)
                self._mtime = mtime

    # ---- keyed hashes ---------------------------------------------------------------------
    def keyed_hash(self, value: str) -> bytes:
        """HMAC-SHA256 of an identifier with the active HMAC key: stable partitioning key, no
        UID in clear on the wire."""
        self._maybe_reload()
        data = self._data
        if data.hmac_active is None or not data.hmac_keys:
            raise UnknownKeyError("this keyring holds no key-hash (HMAC) key")
        return _hmac(data.hmac_keys[data.hmac_active], value)

    def keyed_hashes(self, value: str) -> list[bytes]:
        """The keyed hash of ``value`` under every HMAC key held, the active one first: what
        a record keyed before the last HMAC rotation may carry."""
        data = self._data
        if data.hmac_active is None or not data.hmac_keys:
            raise UnknownKeyError("this keyring holds no key-hash (HMAC) key")
        order = [data.hmac_active, *(k for k in data.hmac_keys if k != data.hmac_active)]
        return [_hmac(data.hmac_keys[k], value) for k in order]

    def blob_name(self, digest: str) -> str:
        """The blob store's name for content ``digest``: keyed, so a name never confirms
        content; independent of the HMAC rotation of Kafka keys."""
        key = self._data.blob_name_key
        if key is None:
            raise UnknownKeyError("this keyring holds no blob naming key")
        return _hmac(key, "blob:" + digest).decode()

    # ---- seal / open ----------------------------------------------------------------------
    def seal(self, plaintext: bytes, aad: bytes, purpose: str) -> bytes:
        """Seal for ``purpose`` with its active public key."""
        self._maybe_reload()
        pk = self._data.purposes.get(purpose)  # one snapshot: kid and key stay together
        if pk is None:
            raise UnknownKeyError(f"no key to seal for purpose {purpose!r} in this keyring")
        dek = AESGCM.generate_key(256)
        nonce = os.urandom(_NONCE_LEN)
        key_block = self._key_block(pk, dek)
        return key_block + nonce + AESGCM(dek).encrypt(nonce, plaintext, MAGIC + aad)

    @staticmethod
    def _key_block(pk: PurposeKeys, dek: bytes) -> bytes:
        """``RSE2 | kid_len | kid | ephemeral | wrapped``: ``dek`` wrapped for the active key."""
        recipient = pk.keys[pk.active].public
        kid = pk.active.encode()
        ephemeral = X25519PrivateKey.generate()
        eph_pub = ephemeral.public_key().public_bytes_raw()
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
        wrapped = aes_key_wrap(wrap_key(pk.active, eph_pub, recipient, shared), dek)
        return MAGIC + bytes([len(kid)]) + kid + eph_pub + wrapped

    def key_id_of(self, envelope: bytes) -> str:
        return parse_header(envelope)[1]

    def purpose_of(self, envelope: bytes) -> str | None:
        """The purpose whose key sealed ``envelope`` (None: legacy or unknown key)."""
        found = self._data.find(self.key_id_of(envelope))
        return None if found is None else found[0]

    def is_current(self, envelope: bytes) -> bool:
        """Sealed with the active key of its purpose (no re-wrap needed)?"""
        kid = self.key_id_of(envelope)
        found = self._data.find(kid)
        return found is not None and self._data.purposes[found[0]].active == kid

    def open(self, envelope: bytes, aad: bytes) -> bytes:
        magic, kid, hlen = parse_header(envelope)
        if magic == LEGACY_MAGIC:
            return self._open_legacy(envelope, aad, kid, hlen)
        dek = self._unwrap(envelope, kid)
        nonce = envelope[hlen - _NONCE_LEN : hlen]
        try:
            return AESGCM(dek).decrypt(nonce, envelope[hlen:], MAGIC + aad)
        except InvalidTag as exc:
            raise IntegrityError("authentication failed: ciphertext or context altered") from exc

    def rewrap(self, envelope: bytes) -> bytes:
        """The same envelope with its data key wrapped for the active key of its purpose
        (after a rotation): nonce and ciphertext unchanged, content never decrypted. Needs to
        open the purpose (its private key, or a KMS that may use it)."""
        magic, kid, hlen = parse_header(envelope)
        if magic == LEGACY_MAGIC:
            raise UnknownKeyError("a legacy (RSE1) envelope cannot be re-wrapped blind")
        found = self._data.find(kid)
        if found is None:
            raise UnknownKeyError(f"key id {kid!r} is not in the keyring")
        pk = self._data.purposes[found[0]]
        if pk.active == kid:
            return envelope
        dek = self._unwrap(envelope, kid)
        return self._key_block(pk, dek) + envelope[hlen - _NONCE_LEN :]

    def _unwrap(self, envelope: bytes, kid: str) -> bytes:
        found = self._data.find(kid)
        if found is None:
            self._maybe_reload(force=True)
            found = self._data.find(kid)
            if found is None:
                why = "was retired" if kid in self._data.retired else "is not in the keyring"
                raise UnknownKeyError(f"key id {kid!r} {why}")
        purpose, pair = found
        start = 5 + len(kid)
        ephemeral = envelope[start : start + _EPHEMERAL_LEN]
        wrapped = envelope[start + _EPHEMERAL_LEN : start + _EPHEMERAL_LEN + _WRAPPED_LEN]
        return self._kek.unwrap(purpose, kid, pair, ephemeral, wrapped)

    def _open_legacy(self, envelope: bytes, aad: bytes, kid: str, hlen: int) -> bytes:
        legacy = self._data.legacy or {}
        if kid not in legacy:
            self._maybe_reload(force=True)
            legacy = self._data.legacy or {}
            if kid not in legacy:
                why = "was retired" if kid in self._data.retired else "is not in the keyring"
                raise UnknownKeyError(f"legacy key id {kid!r} {why}")
        wrapped = envelope[5 + len(kid) : 5 + len(kid) + _WRAPPED_LEN]
        nonce = envelope[hlen - _NONCE_LEN : hlen]
        try:
            dek = aes_key_unwrap(legacy[kid], wrapped)
            return AESGCM(dek).decrypt(nonce, envelope[hlen:], envelope[:hlen] + aad)
        except (InvalidTag, InvalidUnwrap) as exc:
            raise IntegrityError("authentication failed: ciphertext or context altered") from exc


def _hmac(key: bytes, value: str) -> bytes:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32].encode()


def legacy_seal(key: bytes, kid: str, plaintext: bytes, aad: bytes) -> bytes:
    """An RSE1 envelope as the single-keyring code wrote it (migration tests only)."""
    dek = AESGCM.generate_key(256)
    nonce = os.urandom(_NONCE_LEN)
    header = LEGACY_MAGIC + bytes([len(kid)]) + kid.encode() + aes_key_wrap(key, dek) + nonce
    return header + AESGCM(dek).encrypt(nonce, plaintext, header + aad)


def init_keyring_file(path: Path) -> KeyMaterial:
    """Create a master keyring (every purpose, the HMAC and blob naming keys), 0600; keeps an
    existing one (a single-key keyring of an older version is migrated, its keys kept as
    legacy keys)."""
    from shared.security.keyfile import init_master

    return init_master(path)


def rotate_keyring_file(path: Path, purposes: tuple[str, ...] | None = None) -> dict[str, str]:
    """A new active key for each purpose (all by default); older keys stay for opening until
    retired. Returns purpose → new key id."""
    from shared.security.keyfile import rotate_master

    return rotate_master(path, purposes)

"""Encrypted, content-addressed blob store.

An object is addressed by the SHA-256 of its plaintext; on disk its name is a keyed hash of
that digest (so a file name never confirms content; the blob naming key, not the Kafka-key
HMAC, so rotating that never renames blobs), its bytes an AES-256-GCM envelope sealed for the
object's key purpose (instances, volumes, findings) whose associated data is the digest.
Writes are atomic (temp file, fsync, rename, fsync of the folder) and idempotent: writing the
same content twice stores it once. Reads verify both the envelope and the digest.

The backend is a small interface (put/get/exists/delete/replace/names of opaque names), a
local directory by default; an object-storage backend implements the same calls.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from shared.schemas import BlobRef
from shared.security.envelope import EnvelopeError, Keyring


class BlobError(Exception):
    """A blob is missing, or failed its integrity check."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class BlobBackend(ABC):
    @abstractmethod
    def put(self, name: str, data: bytes, *, durable: bool = True) -> bool:
        """Store ``data`` under ``name`` atomically; False if it already existed. With
        ``durable=False`` the object is readable at once but durable only after :meth:`sync`
        (and an existing object is written again: it may be one a crash left unsynced)."""

    def sync(self) -> None:
        """Make every object put with ``durable=False`` since the last call durable (a backend
        whose puts are always durable has nothing to do)."""
        return None

    @abstractmethod
    def get(self, name: str) -> bytes: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def replace(self, name: str, data: bytes) -> None:
        """Overwrite an existing object atomically (re-wrapping after a key rotation)."""

    @abstractmethod
    def names(self) -> Iterator[str]:
        """Every stored object's name."""


class LocalDirBackend(BlobBackend):
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()  # guards _unsynced
        self._sync_lock = threading.Lock()  # a sync returns only once every earlier put is

    def _path(self, name: str) -> Path:
        if not name.isalnum():
            raise ValueError("blob names are alphanumeric")
        return self.root / name[:2] / name

    def put(self, name: str, data: bytes, *, durable: bool = True) -> bool:
        path = self._path(name)
        if durable:
            if path.exists():
                return False
            self._write(path, data)
            return True
        self._write(path, data, sync=False)
        with self._lock:
            self._unsynced.add(path)
        return True

    def sync(self) -> None:
        """fsync the files put with ``durable=False`` and their folders, in parallel (each
        fsync waits on the disk, not the CPU)."""
        with self._sync_lock:  # another thread's sync may be syncing our files: wait for it
            with self._lock:
                files, self._unsynced = self._unsynced, set()
            if not files:
                return
            targets = sorted(files) + sorted({p.parent for p in files})
            with ThreadPoolExecutor(min(8, len(targets))) as pool:
                list(pool.map(_fsync_path, targets))

    def replace(self, name: str, data: bytes) -> None:
        self._write(self._path(name), data)

    def names(self) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if not path.name.startswith("."):
                yield path.name

    @staticmethod
    def _write(path: Path, data: bytes, sync: bool = True) -> None:
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync:
            _fsync_path(path.parent)

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise BlobError("blob_missing", "no such blob") from None

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def usage(self) -> tuple[int, int]:
        """(objects, bytes) stored."""
        count = size = 0
        for path in self.root.glob("??/*"):
            if not path.name.startswith("."):
                count += 1
                size += path.stat().st_size
        return count, size


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # deleted since it was put (retention): nothing of it needs to last
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(
        self, backend: BlobBackend, keyring: Keyring, on_write: Callable[[int], None] | None = None
    ) -> None:
        self.backend = backend
        self.keyring = keyring
        self._on_write = on_write

    def _name(self, digest: str) -> str:
        return self.keyring.blob_name(digest)

    def put(self, data: bytes, purpose: str, *, durable: bool = True) -> BlobRef:
        """Store ``data`` sealed for ``purpose`` (a key purpose of shared.topology). With
        ``durable=False`` it is durable only after :meth:`sync`: the caller syncs before it
        commits anything that refers to it (a stage: ``StageSpec.before_commit``)."""
        digest = hashlib.sha256(data).hexdigest()
        name = self._name(digest)
        if durable and self.backend.exists(name):
            kid = self._stored_key_id(name)
        else:
            sealed = self.keyring.seal(data, digest.encode(), purpose)
            if self.backend.put(name, sealed, durable=durable) and self._on_write is not None:
                self._on_write(len(sealed))
            kid = self.keyring.key_id_of(sealed)
        return BlobRef(digest=digest, size=len(data), key_id=kid)

    def sync(self) -> None:
        """Make what was put with ``durable=False`` durable (before the commit that refers to
        it)."""
        self.backend.sync()

    def delete(self, ref: BlobRef) -> None:
        """Delete the object ``ref`` names (retention); nothing if it is already gone."""
        self.backend.delete(self._name(ref.digest))

    def _stored_key_id(self, name: str) -> str:
        head = self.backend.get(name)[:64]
        return head[5 : 5 + head[4]].decode("ascii", "replace") if len(head) > 5 else ""

    def get(self, ref: BlobRef) -> bytes:
        sealed = self.backend.get(self._name(ref.digest))
        try:
            data = self.keyring.open(sealed, ref.digest.encode())
        except EnvelopeError as exc:
            raise BlobError("blob_integrity", str(exc)) from None
        if hashlib.sha256(data).hexdigest() != ref.digest or len(data) != ref.size:
            raise BlobError("blob_integrity", "content does not match its digest")
        return data


def local_store(
    root: Path, keyring: Keyring, registry: CollectorRegistry | None = None, stage: str = ""
) -> BlobStore:
    """The local-directory store a service uses, counting what it writes when given a
    registry (``radstream_blob_written_bytes_total``, ``radstream_blob_objects_written_total``)."""
    if registry is None:
        return BlobStore(LocalDirBackend(root), keyring)
    written = Counter(
        "radstream_blob_written_bytes",
        "Encrypted bytes written to the blob store",
        ["stage"],
        registry=registry,
    )
    objects = Counter(
        "radstream_blob_objects_written",
        "Objects written to the blob store",
        ["stage"],
        registry=registry,
    )

    def count(size: int) -> None:
        written.labels(stage).inc(size)
        objects.labels(stage).inc()

    return BlobStore(LocalDirBackend(root), keyring, count)

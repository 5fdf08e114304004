"""Key rotation of stored data: which keys seal the blob store, re-wrapping it for the active
keys, and the check before an old key is retired.

The order of a rotation (``radstream keys rotate`` then ``rewrap`` then ``retire``; see
``docs/keys.md``):

1. ``rotate``: each purpose gets a new active key pair; the principals' key files are issued
   again (services re-read them live): new envelopes use the new keys, old ones still open.
2. ``rewrap``: every blob sealed under an old key gets its data key wrapped for the active key
   (:meth:`shared.security.envelope.Keyring.rewrap`: the content is never decrypted, the blob
   keeps its name). Stateful stages re-wrap their changelog values when they restore them
   (restart or rebalance: :func:`shared.runtime.ownership.restore_partition`); records on
   topics with a time retention expire under the old key.
3. ``retire``: the old key is removed from every key file. Refused while a blob still uses it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared.security.envelope import EnvelopeError, Keyring, parse_header
from shared.storage.blobs import BlobBackend, BlobError


def _head(backend: BlobBackend, name: str) -> bytes:
    return backend.get(name)[:300]


def blob_key_usage(backend: BlobBackend) -> Counter[str]:
    """How many blobs each key id seals (from the envelope headers; nothing is decrypted)."""
    usage: Counter[str] = Counter()
    for name in backend.names():
        try:
            usage[parse_header(_head(backend, name) + bytes(64))[1]] += 1
        except (EnvelopeError, BlobError):
            usage["<unreadable>"] += 1
    return usage


@dataclass
class RewrapReport:
    scanned: int = 0
    rewrapped: int = 0
    current: int = 0
    legacy: int = 0  # RSE1 blobs: opened by legacy keys, not re-wrapped (see envelope)
    failed: dict[str, int] = field(default_factory=dict)  # reason → count


def rewrap_blobs(backend: BlobBackend, keyring: Keyring) -> RewrapReport:
    """Re-wrap every blob not sealed with the active key of its purpose (``keyring`` must open
    those purposes: the master keyring). Each blob is replaced atomically; a crash halfway
    leaves every blob readable (old or new wrap), and running again finishes the job."""
    report = RewrapReport()
    for name in list(backend.names()):
        report.scanned += 1
        try:
            sealed = backend.get(name)
            if parse_header(sealed)[0] != b"RSE2":
                report.legacy += 1
                continue
            if keyring.is_current(sealed):
                report.current += 1
                continue
            backend.replace(name, keyring.rewrap(sealed))
            report.rewrapped += 1
        except (EnvelopeError, BlobError) as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            report.failed[reason] = report.failed.get(reason, 0) + 1
    return report

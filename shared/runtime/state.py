"""Keyed state for stateful stages, one store per input partition.

Writes made while handling a batch are pending until the batch's Kafka transaction commits:
they are sent to the compacted changelog topic in that same transaction and only then applied
to the in-memory store. A failed or aborted transaction discards them, so the store always
equals the committed changelog, and a restart (or a new owner of the partition) restores
exactly the state that goes with the committed input offsets.

Keys whose pending writes were thrown away (an aborted transaction, a handler attempt rolled
back, a value restored) are remembered until :meth:`PartitionState.take_discarded`: whatever
keeps an index beside the state (:class:`shared.runtime.timers.KeyTimers`) re-reads just those.

A stage whose values are typed and large (ingest: a series' instance list, one entry per
slice) reads and writes them as objects (:meth:`PartitionState.get_object`,
:meth:`PartitionState.put_object`): a value written is encoded once, when its transaction's
changes are taken (not at every write), and a committed value is decoded once and remembered
(a bounded memo, checked against the stored bytes). Without that, assembling a series of n
slices re-encoded and re-decoded its whole instance list at every slice: O(n^2) work, 0.3 s
of ingest's 0.9 s for 300 slices. The objects handed out are shared: a caller copies one before
changing it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_DELETED = object()
_MISSING = object()
# decoded committed values remembered per partition (most recently used first out): at most
# this many, and at most this many bytes of their encoded JSON (a decoded ingest state is ~6x
# its JSON: a 300-slice series' 85 kB are ~0.5 MB of objects; 4 MB of JSON, ~25 MB decoded,
# holds ~47 such series, more than are in assembly at once)
MEMO_ENTRIES = 256
MEMO_BYTES = 4 * 1024 * 1024

T = TypeVar("T")


class _Encoded:
    """A value written as an object: encoded to the changelog's bytes once, when needed."""

    __slots__ = ("_encode", "_raw", "value")

    def __init__(self, value: Any, encode: Callable[[Any], bytes]) -> None:
        self.value = value
        self._encode = encode
        self._raw: bytes | None = None

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self._encode(self.value)
        return self._raw


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def changelog_aad(changelog: str, key: bytes) -> bytes:
    """Associated data of a sealed changelog value: binds it to its topic and key."""
    return b"\x00".join((changelog.encode(), key, b"radstream.state", b"1"))


def state_purpose(changelog: str) -> str:
    """The key purpose a changelog's values are sealed for (the stage's ``state_purpose`` in
    the topology); a stage the topology does not know (tests, the pass-through canary under
    its own name) seals its state for its dead letters' purpose: only operators open it."""
    from shared.topology import DEADLETTER, purpose_of

    try:
        return purpose_of(changelog)
    except KeyError:
        return DEADLETTER


class PartitionState:
    def __init__(self) -> None:
        self._store: dict[bytes, bytes] = {}
        self._pending: dict[bytes, object] = {}
        self._discarded: set[bytes] = set()
        # key -> (the stored bytes it was decoded from, the decoded object)
        self._memo: OrderedDict[bytes, tuple[bytes, Any]] = OrderedDict()
        self._memo_bytes = 0  # sum of the remembered values' encoded sizes

    # ---- handler API --------------------------------------------------------------------
    def get(self, key: bytes) -> Any | None:
        value = self._pending.get(key, None)
        if value is _DELETED:
            return None
        if isinstance(value, _Encoded):
            return json.loads(value.raw())
        if value is not None:
            return json.loads(value)  # type: ignore[arg-type]
        raw = self._store.get(key)
        return None if raw is None else json.loads(raw)

    def put(self, key: bytes, value: Any) -> None:
        self._pending[key] = _dumps(value)

    def get_object(self, key: bytes, decode: Callable[[Any], T]) -> T | None:
        """The value of ``key`` as ``decode`` makes it from the parsed JSON (None if absent).
        The object written by :meth:`put_object` in the open transaction, or the committed
        value decoded once and remembered: shared, so the caller must not change it (copy it
        first). ``decode`` may raise (an unreadable value); nothing is remembered then."""
        value = self._pending.get(key, None)
        if value is _DELETED:
            return None
        if isinstance(value, _Encoded):
            return value.value  # type: ignore[no-any-return]
        if value is not None:
            return decode(json.loads(value))  # type: ignore[arg-type]
        raw = self._store.get(key)
        if raw is None:
            return None
        hit = self._memo.get(key)
        if hit is not None and hit[0] is raw:
            self._memo.move_to_end(key)
            return hit[1]  # type: ignore[no-any-return]
        obj = decode(json.loads(raw))
        self._remember(key, raw, obj)
        return obj

    def put_object(self, key: bytes, value: Any, encode: Callable[[Any], bytes]) -> None:
        """Write ``value`` (not to be changed afterwards): ``encode(value)`` gives its JSON
        text, called once when the transaction's changes are taken."""
        self._pending[key] = _Encoded(value, encode)

    def delete(self, key: bytes) -> None:
        self._pending[key] = _DELETED

    def keys(self) -> Iterator[bytes]:
        seen = set()
        for key, value in self._pending.items():
            seen.add(key)
            if value is not _DELETED:
                yield key
        for key in list(self._store):
            if key not in seen:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    # ---- runtime API --------------------------------------------------------------------
    def savepoint(self) -> dict[bytes, object]:
        return dict(self._pending)

    def rollback(self, savepoint: dict[bytes, object]) -> None:
        self._discarded.update(
            k for k, v in self._pending.items() if savepoint.get(k, _MISSING) is not v
        )
        self._pending = savepoint

    def pending(self) -> list[tuple[bytes, bytes | None]]:
        """Changes of the open transaction: (key, value) or (key, None) for a delete."""
        return [(k, _raw(v)) for k, v in self._pending.items()]

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is _DELETED:
                self._store.pop(key, None)
                self._forget(key)
            elif isinstance(value, _Encoded):
                raw = value.raw()
                self._store[key] = raw
                self._remember(key, raw, value.value)
            else:
                self._store[key] = value  # type: ignore[assignment]
        self._pending = {}

    def _remember(self, key: bytes, raw: bytes, obj: Any) -> None:
        self._forget(key)
        if len(raw) > MEMO_BYTES:
            return  # larger than the whole memo: decoded at every read
        self._memo[key] = (raw, obj)
        self._memo_bytes += len(raw)
        while len(self._memo) > MEMO_ENTRIES or self._memo_bytes > MEMO_BYTES:
            _, (old, _) = self._memo.popitem(last=False)
            self._memo_bytes -= len(old)

    def _forget(self, key: bytes) -> None:
        hit = self._memo.pop(key, None)
        if hit is not None:
            self._memo_bytes -= len(hit[0])

    def abort(self) -> None:
        self._discarded.update(self._pending)
        self._pending = {}

    def take_discarded(self) -> set[bytes]:
        """Keys whose pending writes were discarded (or restored) since the last call."""
        out, self._discarded = self._discarded, set()
        return out

    def restore(self, key: bytes, value: bytes | None) -> None:
        self._discarded.add(key)
        self._forget(key)
        if value is None:
            self._store.pop(key, None)
        else:
            self._store[key] = value

    def reseal(self, key: bytes) -> None:
        """Write the stored value again with the next transaction (sealed with the active key:
        re-wrapping a value restored from under a rotated-out key)."""
        if key in self._store and key not in self._pending:
            self._pending[key] = self._store[key]


def _raw(value: object) -> bytes | None:
    if value is _DELETED:
        return None
    if isinstance(value, _Encoded):
        return value.raw()
    return value  # type: ignore[return-value]

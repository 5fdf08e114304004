"""Keyed state for stateful stages, one store per input partition.

Writes made while handling a batch are pending until the batch's Kafka transaction commits:
they are sent to the compacted changelog topic in that same transaction and only then applied
to the in-memory store. A failed or aborted transaction discards them, so the store always
equals the committed changelog, and a restart (or a new owner of the partition) restores
exactly the state that goes with the committed input offsets.

Keys whose pending writes were thrown away (an aborted transaction, a handler attempt rolled
back, a value restored) are remembered until :meth:`PartitionState.take_discarded`: whatever
keeps an index beside the state (:class:`shared.runtime.timers.KeyTimers`) re-reads just those.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_DELETED = object()
_MISSING = object()


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

    # ---- handler API --------------------------------------------------------------------
    def get(self, key: bytes) -> Any | None:
        value = self._pending.get(key, None)
        if value is _DELETED:
            return None
        if value is not None:
            return json.loads(value)  # type: ignore[arg-type]
        raw = self._store.get(key)
        return None if raw is None else json.loads(raw)

    def put(self, key: bytes, value: Any) -> None:
        self._pending[key] = json.dumps(value, separators=(",", ":")).encode()

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
        return [(k, None if v is _DELETED else v) for k, v in self._pending.items()]  # type: ignore[misc]

    def commit(self) -> None:
        for key, value in self._pending.items():
            if value is _DELETED:
                self._store.pop(key, None)
            else:
                self._store[key] = value  # type: ignore[assignment]
        self._pending = {}

    def abort(self) -> None:
        self._discarded.update(self._pending)
        self._pending = {}

    def take_discarded(self) -> set[bytes]:
        """Keys whose pending writes were discarded (or restored) since the last call."""
        out, self._discarded = self._discarded, set()
        return out

    def restore(self, key: bytes, value: bytes | None) -> None:
        self._discarded.add(key)
        if value is None:
            self._store.pop(key, None)
        else:
            self._store[key] = value

    def reseal(self, key: bytes) -> None:
        """Write the stored value again with the next transaction (sealed with the active key:
        re-wrapping a value restored from under a rotated-out key)."""
        if key in self._store and key not in self._pending:
            self._pending[key] = self._store[key]

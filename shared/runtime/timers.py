"""Per-key timers for stateful stages: which keys of a partition's state are due, without
reading every value on every tick.

A stage that keeps long-lived keyed state (ingest keeps a fingerprint of every completed series
for weeks; alert keeps the ids it raised) must not load every value once a second to find the
few that need attention. :class:`KeyTimers` keeps, beside each :class:`PartitionState`, when
each key is next due (a heap) and an optional tag per key (to count, e.g., series still in
assembly). It is a *hint* derived from the state, never the truth:

* the handler calls :meth:`KeyTimers.schedule` whenever it writes a key;
* the timer asks :meth:`KeyTimers.due` for the keys due now, reads each from the state and
  decides (a key that turns out not to be due is simply scheduled again);
* a state object it has not seen yet (a partition assigned, restored, re-acquired) is indexed
  by one full scan; keys whose pending writes were discarded (aborted transaction, rolled-back
  attempt) are re-read from the state (:meth:`PartitionState.take_discarded`).

So the index can be late by at most one re-read, and never loses a key. Each partition's
index is touched by one thread at a time (the runtime serialises a partition's handler and
timer); the map of indexes is guarded for the handler threads of different partitions.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.runtime.state import PartitionState

DueOf = Callable[[bytes, PartitionState], tuple[float, str] | None]
"""What the stage says about one key: (when it is next due, tag), or None (no timer: the key
is absent or unreadable)."""


@dataclass
class _Index:
    due: dict[bytes, tuple[float, str]] = field(default_factory=dict)
    heap: list[tuple[float, bytes]] = field(default_factory=list)  # may hold stale entries
    tags: Counter[str] = field(default_factory=Counter)

    def set(self, key: bytes, when: float, tag: str) -> None:
        self.forget(key)
        self.due[key] = (when, tag)
        self.tags[tag] += 1
        heapq.heappush(self.heap, (when, key))
        if len(self.heap) > 4 * len(self.due) + 64:  # drop stale heap entries now and then
            self.heap = [(w, k) for k, (w, _) in self.due.items()]
            heapq.heapify(self.heap)

    def forget(self, key: bytes) -> None:
        old = self.due.pop(key, None)
        if old is not None:
            self.tags[old[1]] -= 1


class KeyTimers:
    def __init__(self, due_of: DueOf) -> None:
        self._due_of = due_of
        self._indexes: weakref.WeakKeyDictionary[PartitionState, _Index] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def _index(self, state: PartitionState) -> _Index:
        with self._lock:
            index = self._indexes.get(state)
            if index is not None:
                return index
            index = self._indexes[state] = _Index()
        for key in list(state.keys()):  # first sight of this state: one full scan
            self._refresh(index, state, key)
        state.take_discarded()
        return index

    def _refresh(self, index: _Index, state: PartitionState, key: bytes) -> None:
        found = self._due_of(key, state)
        if found is None:
            index.forget(key)
        else:
            index.set(key, *found)

    # ---- the handler ------------------------------------------------------------------------
    def schedule(self, state: PartitionState, key: bytes, when: float, tag: str = "") -> None:
        """``key`` (just written) is next due at ``when``."""
        self._index(state).set(key, when, tag)

    def forget(self, state: PartitionState, key: bytes) -> None:
        """``key`` was deleted: no timer."""
        self._index(state).forget(key)

    # ---- the timer --------------------------------------------------------------------------
    def due(self, state: PartitionState, now: float) -> list[bytes]:
        """Keys due at ``now``, earliest first. They stay due until the caller schedules or
        forgets them, so a timer that fails half-way finds them again on its next run."""
        index = self._index(state)
        for key in state.take_discarded():
            self._refresh(index, state, key)
        out: list[tuple[float, bytes]] = []
        seen: set[bytes] = set()
        while index.heap and index.heap[0][0] <= now:
            when, key = heapq.heappop(index.heap)
            current = index.due.get(key)
            if current is not None and current[0] == when and key not in seen:
                seen.add(key)
                out.append((when, key))
            # else a stale entry (rescheduled or forgotten since) or a repeated one
        for entry in out:
            heapq.heappush(index.heap, entry)
        return [key for _, key in out]

    def count(self, state: PartitionState, tag: str) -> int:
        """Keys whose last schedule carried ``tag``."""
        return self._index(state).tags[tag]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(i.due) for i in self._indexes.values())

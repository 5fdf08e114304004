from __future__ import annotations

from shared.runtime.state import PartitionState


def test_pending_writes_apply_only_on_commit() -> None:
    state = PartitionState()
    state.put(b"a", {"n": 1})
    assert state.get(b"a") == {"n": 1}
    state.abort()
    assert state.get(b"a") is None
    state.put(b"a", {"n": 1})
    state.commit()
    state.delete(b"a")
    assert state.get(b"a") is None and state.pending() == [(b"a", None)]
    state.abort()
    assert state.get(b"a") == {"n": 1}


def test_savepoint_rolls_back_one_attempt() -> None:
    state = PartitionState()
    state.put(b"a", 1)
    sp = state.savepoint()
    state.put(b"b", 2)
    state.rollback(sp)
    assert sorted(state.keys()) == [b"a"]


def test_restore_replays_changelog_including_tombstones() -> None:
    state = PartitionState()
    state.restore(b"a", b"1")
    state.restore(b"b", b"2")
    state.restore(b"a", None)
    assert list(state.keys()) == [b"b"] and len(state) == 1

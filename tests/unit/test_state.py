from __future__ import annotations

import json
from typing import Any

import pytest

from shared.runtime.state import PartitionState


class Counted:
    """A decode or encode function that counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, value: Any) -> Any:
        self.calls += 1
        return self.fn(value)


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


def test_an_object_is_encoded_once_per_transaction_and_decoded_once_after() -> None:
    encode = Counted(lambda value: json.dumps({"n": value[0]}, separators=(",", ":")).encode())
    decode = Counted(lambda doc: (doc["n"],))

    state = PartitionState()
    for n in (1, 2, 3):  # three writes in one transaction (three slices of one batch)
        state.put_object(b"a", (n,), encode)
        assert state.get_object(b"a", decode) == (n,)
    assert (encode.calls, decode.calls) == (0, 0)
    assert state.pending() == [(b"a", b'{"n":3}')] and encode.calls == 1
    state.commit()
    assert state.get_object(b"a", decode) == (3,) and state.get(b"a") == {"n": 3}
    assert (encode.calls, decode.calls) == (1, 0), "the committed object is remembered, not decoded"

    state.restore(b"a", b'{"n":7}')  # the changelog says otherwise: the memo is stale
    assert state.get_object(b"a", decode) == (7,) and decode.calls == 1
    assert state.get_object(b"a", decode) == (7,) and decode.calls == 1

    sp = state.savepoint()
    state.put_object(b"a", (8,), encode)
    state.rollback(sp)
    assert state.get_object(b"a", decode) == (7,)
    state.put_object(b"a", (9,), encode)
    state.abort()
    assert state.get_object(b"a", decode) == (7,)
    state.delete(b"a")
    state.commit()
    assert state.get_object(b"a", decode) is None and state.get(b"a") is None


def test_the_memo_of_decoded_values_is_bounded() -> None:
    from shared.runtime.state import MEMO_ENTRIES

    decode = Counted(lambda doc: doc)
    state = PartitionState()
    keys = [f"{i}".encode() for i in range(MEMO_ENTRIES + 10)]
    for i, key in enumerate(keys):
        state.restore(key, str(i).encode())
        assert state.get_object(key, decode) == i
    assert decode.calls == len(keys)
    assert state.get_object(keys[-1], decode) == len(keys) - 1 and decode.calls == len(keys)
    assert state.get_object(keys[0], decode) == 0 and decode.calls == len(keys) + 1  # evicted


def test_the_memo_is_bounded_by_the_encoded_bytes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few large values (whole series) fill the memo by size before its entry count."""
    from shared.runtime import state as state_mod

    monkeypatch.setattr(state_mod, "MEMO_BYTES", 1000)
    decode = Counted(lambda doc: doc)
    state = PartitionState()
    for i in range(4):  # 4 values of ~402 bytes: two fit in 1000
        state.restore(f"{i}".encode(), json.dumps(str(i) * 400).encode())
        state.get_object(f"{i}".encode(), decode)
    assert decode.calls == 4
    state.get_object(b"3", decode)
    state.get_object(b"2", decode)
    assert decode.calls == 4, "the two most recent are remembered"
    state.get_object(b"1", decode)
    assert decode.calls == 5, "the older ones were let go"
    state.restore(b"big", json.dumps("x" * 2000).encode())  # larger than the memo
    state.get_object(b"big", decode)
    state.get_object(b"big", decode)
    assert decode.calls == 7

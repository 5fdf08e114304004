from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.security.envelope import (
    IntegrityError,
    Keyring,
    UnknownKeyError,
    init_keyring_file,
    rotate_keyring_file,
)

AAD = b"radstream.series\x00key\x00radstream.probe\x001"


def test_round_trip_and_fresh_nonce_per_message() -> None:
    ring = Keyring.generate()
    a = ring.seal(b"patient data", AAD)
    b = ring.seal(b"patient data", AAD)
    assert a != b  # fresh data key and nonce each time
    assert b"patient data" not in a
    assert ring.open(a, AAD) == b"patient data"


@pytest.mark.parametrize("where", ["magic", "kid", "wrapped", "nonce", "ciphertext", "tag"])
def test_any_flipped_byte_is_rejected(where: str) -> None:
    ring = Keyring.generate()
    sealed = bytearray(ring.seal(b"x" * 100, AAD))
    klen = sealed[4]
    index = {
        "magic": 0,
        "kid": 5,
        "wrapped": 5 + klen + 3,
        "nonce": 5 + klen + 40 + 2,
        "ciphertext": 5 + klen + 52 + 10,
        "tag": len(sealed) - 1,
    }[where]
    sealed[index] ^= 0x01
    with pytest.raises((IntegrityError, UnknownKeyError)):
        ring.open(bytes(sealed), AAD)


def test_associated_data_binds_context() -> None:
    ring = Keyring.generate()
    sealed = ring.seal(b"x", AAD)
    with pytest.raises(IntegrityError):
        ring.open(sealed, AAD.replace(b"series", b"alerts"))


def test_truncated_and_foreign_inputs() -> None:
    ring = Keyring.generate()
    for junk in (b"", b"RSE1", b"not an envelope at all", ring.seal(b"x", AAD)[:30]):
        with pytest.raises(IntegrityError):
            ring.open(junk, AAD)
    with pytest.raises(UnknownKeyError):
        ring.open(Keyring.generate().seal(b"x", AAD), AAD)


def test_rotation_keeps_old_keys_and_is_picked_up_live(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keyring.json"
    first = init_keyring_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    live = Keyring.from_file(path)
    old = live.seal(b"before", AAD)
    new_kid = rotate_keyring_file(path)
    assert new_kid != first.active
    # a running service sees the new key for an envelope it has never seen the key of
    other = Keyring.from_file(path)
    sealed_new = other.seal(b"after", AAD)
    assert live.open(sealed_new, AAD) == b"after"
    assert other.open(old, AAD) == b"before"
    assert set(other.key_ids) == {first.active, new_kid}
    assert init_keyring_file(path).active == new_kid  # init keeps an existing keyring


def test_keyed_hash_is_stable_secret_and_hides_the_uid() -> None:
    a, b = Keyring.generate(), Keyring.generate()
    uid = "1.2.840.113619.2.55.3.604688119"
    assert a.keyed_hash(uid) == a.keyed_hash(uid)
    assert a.keyed_hash(uid) != b.keyed_hash(uid)
    assert uid.encode() not in a.keyed_hash(uid)
    assert a.keyed_hash(uid) != a.keyed_hash(uid + "1")


def test_a_rotation_in_another_thread_never_splits_key_id_and_key() -> None:
    # Handler threads seal while a rotation may be picked up by another thread: the key id
    # written in the envelope and the key that wrapped its data key must come from one snapshot.
    from shared.security.envelope import KeyringData, new_key_id

    ring = Keyring.generate()
    old = ring._data
    kid = new_key_id()
    rotated = KeyringData(kid, {**old.keys, kid: os.urandom(32)}, old.hmac_key)

    class ReloadedWhileRead(KeyringData):
        """The keyring's data, swapped for the rotated one the moment seal() reads it."""

        def __getattribute__(self, name: str) -> object:
            ring._data = rotated
            return object.__getattribute__(self, name)

    ring._data = ReloadedWhileRead(old.active, old.keys, old.hmac_key)
    sealed = ring.seal(b"x", AAD)
    assert ring.open(sealed, AAD) == b"x"

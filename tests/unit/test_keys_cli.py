"""``radstream keys`` end to end on a local home (no broker): init issues every principal's
key file, rotate + rewrap + retire move the blob store to the new keys without losing a blob,
and a retired key opens nothing any more."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli.main import app
from shared.security.envelope import Keyring, UnknownKeyError
from shared.security.keyfile import read_key_file
from shared.stack.local import LocalStack
from shared.storage import BlobStore, LocalDirBackend
from shared.topology import INSTANCES


def test_init_rotate_rewrap_retire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RADSTREAM_HOME", "RADSTREAM_KEYRING_FILE", "RADSTREAM_BLOB_DIR"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    run = CliRunner().invoke
    assert run(app, ["keys", "init", "--home", str(home)]).exit_code == 0
    stack = LocalStack(home)
    ingest = Keyring.from_file(stack.key_file("ingest"))
    store = BlobStore(LocalDirBackend(home / "blobs"), ingest)
    ref = store.put(b"an instance", INSTANCES)
    old = ref.key_id

    res = run(app, ["keys", "rotate", "--home", str(home), "--purpose", INSTANCES])
    assert res.exit_code == 0, res.output
    new = read_key_file(stack.keyring_path).purposes[INSTANCES].active
    assert new != old
    # retiring a key still in use is refused
    res = run(app, ["keys", "retire", old, "--home", str(home)])
    assert res.exit_code == 1 and "rewrap" in res.output
    res = run(app, ["keys", "rewrap", "--home", str(home)])
    assert res.exit_code == 0 and "1 re-wrapped" in res.output, res.output
    res = run(app, ["keys", "retire", old, "--home", str(home)])
    assert res.exit_code == 0, res.output
    preprocess = Keyring.from_file(stack.key_file("preprocess"))
    assert BlobStore(LocalDirBackend(home / "blobs"), preprocess).get(ref) == b"an instance"
    assert old not in preprocess.key_ids and new in preprocess.key_ids
    # the pager's file never had an instance key, before or after
    pager = read_key_file(stack.key_file("alert-consumer"))
    assert all(p.private is None for p in pager.purposes.get(INSTANCES, _none()).keys.values())
    status = run(app, ["keys", "status", "--home", str(home)])
    assert status.exit_code == 0 and new in status.output and old not in status.output
    with pytest.raises(UnknownKeyError, match="retired"):
        preprocess.open(_sealed_under(old, ingest), b"x")


def _none():  # type: ignore[no-untyped-def]
    from shared.security.envelope import PurposeKeys

    return PurposeKeys("", {})


def _sealed_under(kid: str, ring: Keyring) -> bytes:
    """An envelope naming ``kid`` (its content does not matter: the key id is refused)."""
    sealed = ring.seal(b"x", b"x", INSTANCES)
    own = ring.key_id_of(sealed).encode()
    assert len(own) == len(kid.encode())
    return sealed.replace(own, kid.encode(), 1)

"""Envelope encryption with keys per purpose: round trips, tampering, rotation, re-wrap and
retirement, the key files each principal gets, their modes, and the KMS provider.

The attack tests read as their names say: a pager's (alert-consumer's) key file cannot open an
instance or a volume blob; a scanner's cannot open findings (nor what it sealed itself)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared import topology
from shared.runtime.codec import Codec
from shared.schemas import Alert, InstanceData, SegmentationDone
from shared.security import kek
from shared.security.envelope import (
    IntegrityError,
    KeyFileError,
    Keyring,
    UnknownKeyError,
    init_keyring_file,
    legacy_seal,
    parse_header,
    rotate_keyring_file,
)
from shared.security.keyfile import (
    issue_all,
    issue_role,
    mode_problem,
    read_key_file,
    retire,
    rotate_hmac,
)
from shared.security.rotation import blob_key_usage, rewrap_blobs
from shared.stack.principals import ROLES
from shared.storage import BlobStore, LocalDirBackend
from shared.storage.blobs import BlobError
from shared.topology import FINDINGS, INSTANCES, VOLUMES

AAD = b"radstream.series\x00key\x00radstream.probe\x001"
P = topology.SERIES


def test_round_trip_and_fresh_nonce_per_message() -> None:
    ring = Keyring.generate()
    a = ring.seal(b"patient data", AAD, P)
    b = ring.seal(b"patient data", AAD, P)
    assert a != b  # fresh data key, ephemeral key and nonce each time
    assert b"patient data" not in a
    assert ring.open(a, AAD) == b"patient data"
    assert ring.key_id_of(a) == ring.active_key_id(P) and ring.purpose_of(a) == P


@pytest.mark.parametrize(
    "where", ["magic", "kid", "ephemeral", "wrapped", "nonce", "ciphertext", "tag"]
)
def test_any_flipped_byte_is_rejected(where: str) -> None:
    ring = Keyring.generate()
    sealed = bytearray(ring.seal(b"x" * 100, AAD, P))
    klen = sealed[4]
    index = {
        "magic": 0,
        "kid": 5,
        "ephemeral": 5 + klen + 3,
        "wrapped": 5 + klen + 32 + 3,
        "nonce": 5 + klen + 72 + 2,
        "ciphertext": 5 + klen + 84 + 10,
        "tag": len(sealed) - 1,
    }[where]
    sealed[index] ^= 0x01
    with pytest.raises((IntegrityError, UnknownKeyError)):
        ring.open(bytes(sealed), AAD)


def test_associated_data_binds_context() -> None:
    ring = Keyring.generate()
    sealed = ring.seal(b"x", AAD, P)
    with pytest.raises(IntegrityError):
        ring.open(sealed, AAD.replace(b"series", b"alerts"))


def test_truncated_and_foreign_inputs() -> None:
    ring = Keyring.generate()
    for junk in (b"", b"RSE2", b"not an envelope at all", ring.seal(b"x", AAD, P)[:30]):
        with pytest.raises(IntegrityError):
            ring.open(junk, AAD)
    with pytest.raises(UnknownKeyError):
        ring.open(Keyring.generate().seal(b"x", AAD, P), AAD)


def test_keyed_hash_is_stable_secret_and_hides_the_uid() -> None:
    a, b = Keyring.generate(), Keyring.generate()
    uid = "1.2.840.113619.2.55.3.604688119"
    assert a.keyed_hash(uid) == a.keyed_hash(uid)
    assert a.keyed_hash(uid) != b.keyed_hash(uid)
    assert uid.encode() not in a.keyed_hash(uid)
    assert a.keyed_hash(uid) != a.keyed_hash(uid + "1")
    # blob names use their own key: not the Kafka key of the same string
    assert a.blob_name("ab" * 32) != a.keyed_hash("blob:" + "ab" * 32).decode()


# ---- who holds what ---------------------------------------------------------------------------
@pytest.fixture
def issued(tmp_path: Path) -> tuple[Path, dict[str, Keyring]]:
    """A master keyring and every principal's key file, as the local stack issues them."""
    master = tmp_path / "secrets" / "keyring.json"
    init_keyring_file(master)
    files = issue_all(master, tmp_path / "secrets" / "principals")
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return master, {name: Keyring.from_file(path) for name, path in files.items()}


def _sealed_by_pipeline(master: Keyring, tmp: Path) -> tuple[BlobStore, dict[str, object]]:
    """An instance (topic record and blob), a volume blob and a findings record, sealed as the
    stages seal them."""
    store = BlobStore(LocalDirBackend(tmp / "blobs"), master)
    codec = Codec(master)
    inst = codec.encode("radstream.instances", b"k", InstanceData(source="ct", data=b"DICM"))
    done = SegmentationDone.model_validate(
        {
            "study_instance_uid": "1.2",
            "series_instance_uid": "1.2.3",
            "revision": 1,
            "modality": "CT",
            "task": "none",
            "algorithm": "a",
            "algorithm_version": "1",
            "source_offset": 0,
            "source_partition": 0,
            "last_published_at": datetime(2024, 1, 1, tzinfo=UTC),
        }
    )
    return store, {
        "instance_record": inst,
        "instance_blob": store.put(b"DICM pixel data", INSTANCES),
        "volume_blob": store.put(b"voxels", VOLUMES),
        "mask_blob": store.put(b"masks", FINDINGS),
        "findings_record": codec.encode("radstream.findings", b"k", done),
    }


def test_a_pager_key_file_cannot_decrypt_an_instance_or_a_volume_blob(
    issued: tuple[Path, dict[str, Keyring]], tmp_path: Path
) -> None:
    """The attack: a pager integration (alert-consumer) is compromised; with its key file the
    attacker has stolen the blob store and the instances topic. Nothing opens."""
    master_path, rings = issued
    store, sealed = _sealed_by_pipeline(Keyring.from_file(master_path), tmp_path)
    pager = rings["alert-consumer"]
    stolen = BlobStore(store.backend, pager)
    for ref in ("instance_blob", "volume_blob", "mask_blob"):
        with pytest.raises((BlobError, UnknownKeyError)):
            stolen.get(sealed[ref])  # type: ignore[arg-type]
    value, headers = sealed["instance_record"]  # type: ignore[misc]
    with pytest.raises(UnknownKeyError, match=r"public half only|not in the keyring"):
        pager.open(value, b"any context")
    # what it holds: no private key of any purpose but alerts, no HMAC or blob naming key
    material = read_key_file(pager._path)  # type: ignore[arg-type]
    holds_private = {
        p for p, pk in material.purposes.items() if any(k.private for k in pk.keys.values())
    }
    assert holds_private == {topology.ALERTS}
    assert material.hmac_keys == {} and material.blob_name_key is None
    # and it does read its alerts
    alert = Alert.model_validate(
        {
            "alert_id": "a1",
            "severity": "high",
            "finding": "nodule",
            "finding_label": "n1",
            "rule": "r",
            "study_instance_uid": "1.2",
            "series_instance_uid": "1.2.3",
            "revision": 1,
            "modality": "CT",
            "algorithm": "a",
            "algorithm_version": "1",
            "source_partition": 0,
            "source_offset": 0,
            "latency_seconds": 1.0,
        }
    )
    value, headers = Codec(Keyring.from_file(master_path)).encode("radstream.alerts", b"k", alert)
    from pydantic import TypeAdapter

    assert (
        Codec(pager).decode("radstream.alerts", b"k", value, headers, TypeAdapter(Alert)) == alert
    )


def test_a_scanner_key_file_seals_instances_but_opens_nothing(
    issued: tuple[Path, dict[str, Keyring]], tmp_path: Path
) -> None:
    """A scanner (or the gateway) seals instances with a public key: it cannot open findings,
    nor even the instances it sent itself."""
    master_path, rings = issued
    _, sealed = _sealed_by_pipeline(Keyring.from_file(master_path), tmp_path)
    for who in ("scanner", "gateway"):
        ring = rings[who]
        value, _ = sealed["findings_record"]  # type: ignore[misc]
        with pytest.raises(UnknownKeyError):
            ring.open(value, b"ctx")
        own = ring.seal(b"an instance", b"ctx", INSTANCES)
        with pytest.raises(UnknownKeyError, match="public half only"):
            ring.open(own, b"ctx")
        assert rings["ingest"].open(own, b"ctx") == b"an instance"  # ingest reads it
        assert not any(ring.can_open(p) for p in topology.PURPOSES)


def test_each_role_opens_exactly_what_it_reads(issued: tuple[Path, dict[str, Keyring]]) -> None:
    _, rings = issued
    opens = {
        name: {p for p in topology.PURPOSES if ring.can_open(p)} for name, ring in rings.items()
    }
    assert opens["scanner"] == opens["gateway"] == set()
    assert opens["alert-consumer"] == {topology.ALERTS}
    assert opens["ingest"] == {INSTANCES}
    assert opens["preprocess"] == {topology.SERIES, INSTANCES}
    assert opens["segmentation"] == {VOLUMES}
    assert opens["alert"] == {FINDINGS, topology.ALERTS}
    assert opens["results"] == {INSTANCES, VOLUMES, FINDINGS}
    assert INSTANCES not in opens["operator"]  # operators never read raw instances
    assert opens["auditor"] == {topology.AUDIT}
    assert opens["exporter"] == {INSTANCES, FINDINGS, topology.ALERTS}
    for name, role in ROLES.items():
        assert opens[name] == set(role.opens), name
        assert all(rings[name].can_seal(p) for p in role.seals), name
    # only a principal that writes audit events can seal them; nobody but auditors and the
    # audit sequencer (which chains them) opens them
    assert sorted(n for n, o in opens.items() if topology.AUDIT in o) == ["auditlog", "auditor"]
    assert opens["auditlog"] == {topology.AUDIT}


# ---- key files --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys.json"
    init_keyring_file(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="refusing"):
        Keyring.from_file(path)
    os.chmod(path, 0o400)
    Keyring.from_file(path)  # owner-only is fine


def test_mode_rule_allows_a_kubernetes_fsgroup_secret_and_nothing_looser() -> None:
    def st(mode: int, uid: int, gid: int) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    me, my_group = 10001, 10001
    assert mode_problem(st(0o400, me, my_group), me, my_group) == ""
    assert mode_problem(st(0o440, 0, my_group), me, my_group) == ""  # root:fsGroup 0440
    assert "group may read" in mode_problem(st(0o440, 0, 0), me, my_group)
    assert "group may read" in mode_problem(st(0o640, me, my_group), me, my_group)
    assert "others" in mode_problem(st(0o444, 0, my_group), me, my_group)
    assert "owned by uid" in mode_problem(st(0o400, 4242, my_group), me, my_group)


def test_password_files_are_checked_too(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from shared.config import KafkaSettings
    from shared.security.kafka import client_kwargs

    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o644)
    settings = KafkaSettings(username="ingest", password=SecretStr(""), password_file=pw)
    with pytest.raises(KeyFileError):
        client_kwargs(settings)
    os.chmod(pw, 0o600)
    assert client_kwargs(settings)["sasl_plain_password"] == "s3cret"


# ---- rotation ---------------------------------------------------------------------------------
def test_rotation_keeps_old_data_readable_until_rewrapped_then_retires_the_old_key(
    tmp_path: Path,
) -> None:
    """Rotate: new envelopes use the new key, old ones still open (services pick the new key
    up live). Re-wrap: every blob moves to the new key without being decrypted. Retire: the
    old key is gone from every key file; anything still sealed under it no longer opens."""
    master = tmp_path / "secrets" / "keyring.json"
    init_keyring_file(master)
    principals = tmp_path / "secrets" / "principals"
    files = issue_all(master, principals)
    preprocess = Keyring.from_file(files["preprocess"])  # a running service's keyring
    store = BlobStore(LocalDirBackend(tmp_path / "blobs"), Keyring.from_file(master))
    old_kid = store.keyring.active_key_id(INSTANCES)
    refs = [store.put(f"instance {i}".encode(), INSTANCES) for i in range(5)]
    stray = Keyring.from_file(master).seal(b"a record on a topic", b"ctx", INSTANCES)

    new = rotate_keyring_file(master, (INSTANCES,))[INSTANCES]
    issue_all(master, principals)
    os.utime(files["preprocess"], ns=(1, 1))  # a distinct mtime, whatever the clock's grain
    preprocess._maybe_reload(force=True)
    assert preprocess.active_key_id(INSTANCES) == new != old_kid
    service_store = BlobStore(store.backend, preprocess)
    assert [service_store.get(r) for r in refs] == [f"instance {i}".encode() for i in range(5)]
    fresh = Keyring.from_file(files["ingest"]).seal(b"after", b"ctx", INSTANCES)
    assert preprocess.key_id_of(fresh) == new and preprocess.open(fresh, b"ctx") == b"after"
    assert blob_key_usage(store.backend)[old_kid] == 5

    before = {name: store.backend.get(name) for name in store.backend.names()}
    report = rewrap_blobs(store.backend, Keyring.from_file(master))
    assert (report.rewrapped, report.current, report.failed) == (5, 0, {})
    usage = blob_key_usage(store.backend)
    assert usage[new] == 5 and old_kid not in usage
    for name, old in before.items():  # same nonce and ciphertext: nothing was decrypted
        now = store.backend.get(name)
        assert now[parse_header(now)[2] - 12 :] == old[parse_header(old)[2] - 12 :]
    assert rewrap_blobs(store.backend, Keyring.from_file(master)).rewrapped == 0  # idempotent

    assert retire(master, old_kid) == INSTANCES
    with pytest.raises(KeyFileError, match="active"):
        retire(master, new)
    issue_all(master, principals)
    for name in ("preprocess", "ingest", "results", "exporter"):
        ring = Keyring.from_file(files[name])
        assert old_kid not in ring.key_ids
        assert BlobStore(store.backend, ring).get(refs[0]) == b"instance 0"
        with pytest.raises(UnknownKeyError, match="retired"):
            ring.open(stray, b"ctx")


def test_changelog_values_under_an_old_key_are_resealed_on_restore() -> None:
    """A stateful stage restoring its state re-writes what an old key sealed (the next commit
    carries it), so compaction leaves nothing under the old key."""
    from shared.runtime.state import PartitionState

    ring = Keyring.generate()
    old = ring.seal(b'{"a":1}', b"ctx", INSTANCES)
    rotated = replace(ring.material)  # same material, then a rotation in memory
    from shared.security.envelope import KeyPair, PurposeKeys

    pk = rotated.purposes[INSTANCES]
    kid = "instances-new"
    purposes = {
        **rotated.purposes,
        INSTANCES: PurposeKeys(kid, {**pk.keys, kid: KeyPair.generate()}),
    }
    ring2 = Keyring(replace(rotated, purposes=purposes))
    assert not ring2.is_current(old) and ring2.open(old, b"ctx") == b'{"a":1}'
    state = PartitionState()
    state.restore(b"k", ring2.open(old, b"ctx"))
    state.reseal(b"k")
    assert state.pending() == [(b"k", b'{"a":1}')]


def test_hmac_rotation_keeps_old_keys_recognised_and_blob_names_stable(tmp_path: Path) -> None:
    master = tmp_path / "keyring.json"
    init_keyring_file(master)
    before = Keyring.from_file(master)
    uid = "1.2.3.4"
    old_key = before.keyed_hash(uid)
    rotate_hmac(master)
    after = Keyring.from_file(master)
    assert after.keyed_hash(uid) != old_key  # new records: a new key (and maybe partition)
    assert after.keyed_hashes(uid) == [after.keyed_hash(uid), old_key]  # old ones recognised
    assert after.blob_name("ab" * 32) == before.blob_name("ab" * 32)  # blobs keep their names


def test_a_single_keyring_of_the_old_format_is_migrated_with_legacy_keys(tmp_path: Path) -> None:
    import base64

    key, hmac_key = os.urandom(32), os.urandom(32)
    path = tmp_path / "keyring.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "active": "k-old",
                "keys": {"k-old": base64.b64encode(key).decode()},
                "hmac_key": base64.b64encode(hmac_key).decode(),
            }
        )
    )
    os.chmod(path, 0o600)
    old_envelope = legacy_seal(key, "k-old", b"old state", b"ctx")
    init_keyring_file(path)
    master = Keyring.from_file(path)
    assert master.open(old_envelope, b"ctx") == b"old state"
    assert json.loads(path.read_text())["version"] == 2
    # old Kafka keys and blob names stay what they were
    import hashlib
    import hmac

    expected = hmac.new(hmac_key, b"1.2.3", hashlib.sha256).hexdigest()[:32].encode()
    assert master.keyed_hash("1.2.3") == expected
    assert master.blob_name("d") == hmac.new(hmac_key, b"blob:d", hashlib.sha256).hexdigest()[:32]
    # principals that open anything keep the legacy keys until they are retired
    ingest = Keyring(issue_role(read_key_file(path), "ingest"))
    assert ingest.open(old_envelope, b"ctx") == b"old state"
    scanner = Keyring(issue_role(read_key_file(path), "scanner"))
    with pytest.raises(UnknownKeyError):
        scanner.open(old_envelope, b"ctx")
    retire(path, "k-old")
    with pytest.raises(UnknownKeyError, match="retired"):
        Keyring.from_file(path).open(old_envelope, b"ctx")


def test_a_rotation_in_another_thread_never_splits_key_id_and_key() -> None:
    # Handler threads seal while a rotation may be picked up by another thread: the key id
    # written in the envelope and the key that wrapped its data key must come from one snapshot.
    from shared.security.envelope import KeyMaterial, KeyPair, PurposeKeys

    ring = Keyring.generate()
    old = ring._data
    kid = "series-rotated"
    pk = old.purposes[P]
    rotated = replace(
        old, purposes={**old.purposes, P: PurposeKeys(kid, {**pk.keys, kid: KeyPair.generate()})}
    )

    class ReloadedWhileRead(KeyMaterial):
        """The keyring's material, swapped for the rotated one the moment seal() reads it."""

        def __getattribute__(self, name: str) -> object:
            ring._data = rotated
            return object.__getattribute__(self, name)

    ring._data = ReloadedWhileRead(**{f: getattr(old, f) for f in old.__dataclass_fields__})
    sealed = ring.seal(b"x", AAD, P)
    assert ring.open(sealed, AAD) == b"x"


# ---- the KMS provider -------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["memory", "socket"])
def test_through_a_kms_the_pager_still_cannot_open_instances(
    tmp_path: Path, transport: str
) -> None:
    """Key files without private keys; a KMS (in memory, or the stand-in on a Unix socket)
    unwraps within each principal's role, after checking its token."""
    master = tmp_path / "keyring.json"
    init_keyring_file(master)
    root = tmp_path / "principals"
    files = issue_all(master, root, with_private=False)
    assert all(
        k.private is None
        for f in files.values()
        for pk in read_key_file(f).purposes.values()
        for k in pk.keys.values()
    )
    tokens = kek.issue_tokens(root, list(files))
    server = kek.KmsServer.for_roles(master, tokens)
    socket_server = None
    if transport == "memory":
        link: kek.KmsTransport = kek.InMemoryKms(server)
    else:
        socket_server = kek.serve_unix(server, tmp_path / "kms.sock")
        link = kek.UnixSocketKms(tmp_path / "kms.sock")
    try:

        def ring(name: str, token: str | None = None) -> Keyring:
            secret = token or (root / name / kek.TOKEN_FILE).read_text()
            return Keyring.from_file(files[name], kek.KmsKek(link, name, secret))

        sealed = Keyring.from_file(master).seal(b"pixels", b"ctx", INSTANCES)
        assert ring("preprocess").open(sealed, b"ctx") == b"pixels"
        assert ring("preprocess").can_open(INSTANCES)
        pager = ring("alert-consumer")
        assert not pager.can_open(INSTANCES) and pager.can_open(topology.ALERTS)
        with pytest.raises(UnknownKeyError, match="not in the keyring"):
            pager.open(sealed, b"ctx")
        # the pager's key file lists no instances key, so make it name one: the KMS refuses
        pager_token = (root / "alert-consumer" / kek.TOKEN_FILE).read_text()
        material = read_key_file(files["preprocess"])
        forged = Keyring(material, kek=kek.KmsKek(link, "alert-consumer", pager_token))
        with pytest.raises(UnknownKeyError, match="refuses"):
            forged.open(sealed, b"ctx")
        # preprocess's token under the pager's name: authentication fails
        wrong = kek.KmsKek(
            link, "alert-consumer", (root / "preprocess" / kek.TOKEN_FILE).read_text()
        )
        with pytest.raises(UnknownKeyError, match="auth"):
            Keyring(material, kek=wrong).open(sealed, b"ctx")
        assert server.denials == 2
    finally:
        if socket_server is not None:
            socket_server.shutdown()
            socket_server.server_close()
        if isinstance(link, kek.UnixSocketKms):
            link.close()

"""Key files: the master keyring, each principal's share of it, and the operations on them.

* The **master keyring** holds every purpose's key pairs (both halves), the HMAC keys of
  Kafka keys and the blob naming key. Only the key administrator has it (the local stack keeps
  it in ``<home>/secrets/keyring.json``); no service ever reads it.
* A **principal's key file** (:func:`issue`) holds what its role needs
  (:mod:`shared.stack.principals`): the active *public* key of each purpose it writes and every
  *private* key of each purpose it reads; the HMAC keys if it makes Kafka keys; the blob naming
  key if it touches blobs. A pager integration's file cannot open an instance or a volume; a
  scanner's cannot open anything.
* Every key file is written 0600 and refused on reading when others than its owner may read it
  (:func:`check_mode`).

Rotation (:func:`rotate_master`, :func:`rotate_hmac`) adds new active keys and keeps the old
ones for opening; re-issuing the principals' files distributes them (running services re-read
their file when it changes). :func:`retire` removes an old key once nothing sealed under it is
left (see :mod:`shared.security.rotation` for re-wrapping blobs and the checks).

File format (JSON, base64 keys)::

    {"version": 2, "principal": null | "<name>",
     "purposes": {"<purpose>": {"active": "<kid>",
                                "keys": {"<kid>": {"public": "..", "private": ".."}}}},
     "hmac": {"active": "<id>", "keys": {"<id>": ".."}},
     "blob_name_key": "..", "legacy": {"<kid>": ".."}, "retired": ["<kid>", ...]}

A version 1 file (one symmetric key-encryption key for everything) is read as a master keyring
whose old keys are *legacy* keys (they still open RSE1 envelopes), whose HMAC key stays the
active key-hash key and also names blobs, so existing Kafka keys and blob names stay valid.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from shared import topology
from shared.security.envelope import (
    KeyFileError,
    KeyMaterial,
    KeyPair,
    PurposeKeys,
    new_key_id,
)

KEYS_FILE = "keys.json"


# ---- file mode ------------------------------------------------------------------------------
def mode_problem(st: os.stat_result, euid: int | None = None, egid: int | None = None) -> str:
    """Why a key or password file with this stat may not be trusted ("" if it may).

    Refused: anything others may read or write; group write; group read, unless the file
    belongs to root and to this (non-root) process's own group (how Kubernetes mounts a Secret
    for a pod's ``fsGroup``: root-owned, mode | 0440, shared only by that pod's containers); a
    file owned by another user than this one or root."""
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (euid, 0):
        return f"owned by uid {st.st_uid}, not by this user ({euid}) or root"
    if mode & 0o007:
        return f"mode {mode:04o}: others may access it"
    if mode & 0o020:
        return f"mode {mode:04o}: its group may write it"
    if mode & 0o040 and not (st.st_uid == 0 and st.st_gid == egid and euid != 0):
        return f"mode {mode:04o}: its group may read it"
    return ""


def check_mode(path: Path) -> None:
    """KeyFileError unless only its owner (see :func:`mode_problem`) may read ``path``."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"no key file at {path}") from exc
    problem = mode_problem(st)
    if problem:
        raise KeyFileError(f"refusing {path}: {problem} (chmod 600 it)")


def read_secret_file(path: Path) -> str:
    """A password or token file's content, after the same ownership and mode check."""
    check_mode(path)
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` readable by its owner only (0600), folder 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- encoding -------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def encode(material: KeyMaterial) -> str:
    return json.dumps(
        {
            "version": 2,
            "principal": material.principal,
            "purposes": {
                name: {
                    "active": pk.active,
                    "keys": {
                        kid: {"public": _b64(pair.public)}
                        | ({"private": _b64(pair.private)} if pair.private else {})
                        for kid, pair in pk.keys.items()
                    },
                }
                for name, pk in material.purposes.items()
            },
            "hmac": {
                "active": material.hmac_active,
                "keys": {k: _b64(v) for k, v in (material.hmac_keys or {}).items()},
            },
            "blob_name_key": _b64(material.blob_name_key) if material.blob_name_key else None,
            "legacy": {k: _b64(v) for k, v in (material.legacy or {}).items()},
            "retired": list(material.retired),
        },
        indent=2,
    )


def decode(text: str) -> KeyMaterial:
    try:
        raw: dict[str, Any] = json.loads(text)
        if raw.get("version", 1) == 1:
            return _from_v1(raw)
        if raw.get("version") != 2:
            raise KeyFileError(f"unknown key file version {raw.get('version')!r}")
        purposes = {}
        for name, pk in raw["purposes"].items():
            keys = {
                kid: KeyPair(
                    _unb64(k["public"]), _unb64(k["private"]) if k.get("private") else None
                )
                for kid, k in pk["keys"].items()
            }
            if pk["active"] not in keys:
                raise KeyFileError(f"purpose {name}: active key {pk['active']} missing")
            if any(
                len(p.public) != 32 or (p.private and len(p.private) != 32) for p in keys.values()
            ):
                raise KeyFileError(f"purpose {name}: a key is not an X25519 key")
            purposes[name] = PurposeKeys(pk["active"], keys)
        hmac_raw = raw.get("hmac") or {}
        hmac_keys = {k: _unb64(v) for k, v in (hmac_raw.get("keys") or {}).items()}
        active = hmac_raw.get("active")
        if active is not None and active not in hmac_keys:
            raise KeyFileError("the active HMAC key is missing")
        blob = raw.get("blob_name_key")
        return KeyMaterial(
            purposes=purposes,
            hmac_active=active,
            hmac_keys=hmac_keys,
            blob_name_key=_unb64(blob) if blob else None,
            legacy={k: _unb64(v) for k, v in (raw.get("legacy") or {}).items()},
            retired=tuple(raw.get("retired") or ()),
            principal=raw.get("principal"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"malformed key file: {type(exc).__name__}") from None


def _from_v1(raw: dict[str, Any]) -> KeyMaterial:
    """A single-keyring file: fresh key pairs per purpose, the old keys kept as legacy keys,
    the old HMAC key kept for Kafka keys and blob names."""
    legacy = {k: _unb64(v) for k, v in raw["keys"].items()}
    if raw["active"] not in legacy or any(len(k) != 32 for k in legacy.values()):
        raise KeyFileError("keyring: active key missing or a key is not 256 bits")
    fresh = new_master()
    hmac_key = _unb64(raw["hmac_key"])
    return replace(
        fresh,
        hmac_active="h-legacy",
        hmac_keys={"h-legacy": hmac_key},
        blob_name_key=hmac_key,
        legacy=legacy,
    )


def read_key_file(path: Path, *, check: bool = True) -> KeyMaterial:
    """A key file, refused (KeyFileError) when its mode lets others read it."""
    if check:
        check_mode(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise KeyFileError(f"no key file at {path}") from exc
    return decode(text)


def write_key_file(path: Path, material: KeyMaterial) -> None:
    write_private(path, encode(material))


# ---- the master keyring ---------------------------------------------------------------------
def _new_purpose(name: str) -> PurposeKeys:
    kid = new_key_id(name)
    return PurposeKeys(kid, {kid: KeyPair.generate()})


def new_master() -> KeyMaterial:
    hmac_id = new_key_id("h")
    return KeyMaterial(
        purposes={p: _new_purpose(p) for p in topology.PURPOSES},
        hmac_active=hmac_id,
        hmac_keys={hmac_id: os.urandom(32)},
        blob_name_key=os.urandom(32),
        legacy={},
    )


def init_master(path: Path) -> KeyMaterial:
    """Create the master keyring at ``path``; an existing one is kept (a version 1 keyring is
    migrated in place, see the module doc); purposes added to the topology since are added."""
    if path.exists():
        material = read_key_file(path)
        raw_version = json.loads(path.read_text()).get("version", 1)
        missing = [p for p in topology.PURPOSES if p not in material.purposes]
        if missing:
            purposes = dict(material.purposes) | {p: _new_purpose(p) for p in missing}
            material = replace(material, purposes=purposes)
        if missing or raw_version != 2:
            write_key_file(path, material)
        return material
    material = new_master()
    write_key_file(path, material)
    return material


def rotate_master(path: Path, purposes: Iterable[str] | None = None) -> dict[str, str]:
    """A new active key pair for each of ``purposes`` (all by default); returns their ids."""
    material = read_key_file(path)
    wanted = list(purposes) if purposes is not None else list(material.purposes)
    out = {}
    updated = dict(material.purposes)
    for name in wanted:
        if name not in updated:
            raise KeyFileError(f"no purpose {name!r}; purposes: {', '.join(updated)}")
        kid = new_key_id(name)
        updated[name] = PurposeKeys(kid, {**updated[name].keys, kid: KeyPair.generate()})
        out[name] = kid
    write_key_file(path, replace(material, purposes=updated))
    return out


def rotate_hmac(path: Path) -> str:
    """A new active HMAC key for Kafka keys; the old ones stay (recognised, never made).
    Blob names do not change (they have their own key)."""
    material = read_key_file(path)
    hid = new_key_id("h")
    keys = {**(material.hmac_keys or {}), hid: os.urandom(32)}
    write_key_file(path, replace(material, hmac_active=hid, hmac_keys=keys))
    return hid


def key_ids(material: KeyMaterial) -> dict[str, str]:
    """Every key id the material holds → what it is ("<purpose>", "hmac" or "legacy")."""
    out = {kid: name for name, pk in material.purposes.items() for kid in pk.keys}
    out |= {kid: "hmac" for kid in material.hmac_keys or {}}
    out |= {kid: "legacy" for kid in material.legacy or {}}
    return out


def retire(path: Path, kid: str) -> str:
    """Remove an old key for good (never an active one); what it was is returned. Envelopes
    sealed under it can no longer be opened: re-wrap first (shared.security.rotation)."""
    material = read_key_file(path)
    kind = key_ids(material).get(kid)
    if kind is None:
        raise KeyFileError(f"no key {kid!r} in {path}")
    if kind == "hmac":
        if kid == material.hmac_active:
            raise KeyFileError(f"{kid} is the active HMAC key: rotate first")
        hmac_keys = {k: v for k, v in (material.hmac_keys or {}).items() if k != kid}
        material = replace(material, hmac_keys=hmac_keys)
    elif kind == "legacy":
        legacy = {k: v for k, v in (material.legacy or {}).items() if k != kid}
        material = replace(material, legacy=legacy)
    else:
        pk = material.purposes[kind]
        if pk.active == kid:
            raise KeyFileError(f"{kid} is the active key of {kind}: rotate first")
        keys = {k: v for k, v in pk.keys.items() if k != kid}
        material = replace(
            material, purposes={**material.purposes, kind: PurposeKeys(pk.active, keys)}
        )
    write_key_file(path, replace(material, retired=(*material.retired, kid)))
    return kind


# ---- principals' shares ---------------------------------------------------------------------
def issue(
    master: KeyMaterial,
    principal: str,
    opens: Iterable[str],
    seals: Iterable[str],
    hmac: bool,
    blob_names: bool,
    *,
    with_private: bool = True,
) -> KeyMaterial:
    """One principal's key material: every key pair of the purposes it opens (private halves
    only ``with_private``: without, a KMS opens for it), the active public key of the purposes
    it only seals."""
    opens, seals = set(opens), set(seals)
    purposes: dict[str, PurposeKeys] = {}
    for name in sorted(opens | seals):
        pk = master.purposes[name]
        if name in opens:
            keys = {
                kid: pair if with_private else pair.public_only() for kid, pair in pk.keys.items()
            }
        else:
            keys = {pk.active: pk.keys[pk.active].public_only()}
        purposes[name] = PurposeKeys(pk.active, keys)
    return KeyMaterial(
        purposes=purposes,
        hmac_active=master.hmac_active if hmac else None,
        hmac_keys=dict(master.hmac_keys or {}) if hmac else {},
        blob_name_key=master.blob_name_key if blob_names else None,
        legacy=dict(master.legacy or {}) if opens and with_private else {},
        retired=master.retired,
        principal=principal,
    )


def issue_role(master: KeyMaterial, principal: str, *, with_private: bool = True) -> KeyMaterial:
    """:func:`issue` for a principal of the access matrix (shared/stack/principals.py)."""
    from shared.stack.principals import ROLES

    role = ROLES[principal]
    return issue(
        master,
        principal,
        role.opens,
        role.seals,
        role.hmac,
        role.blob_names,
        with_private=with_private,
    )


def principal_key_file(root: Path, principal: str) -> Path:
    """Where the local stack (and the tests) keep a principal's key file."""
    return root / principal / KEYS_FILE


def issue_all(master_path: Path, root: Path, *, with_private: bool = True) -> dict[str, Path]:
    """Write every principal's key file under ``root/<principal>/keys.json`` (0600, folders
    0700) from the master keyring; returns principal → file. Idempotent: a file whose content
    would not change is left alone (running services see no spurious reload)."""
    from shared.stack.principals import ROLES

    master = read_key_file(master_path)
    out = {}
    for principal in ROLES:
        path = principal_key_file(root, principal)
        text = encode(issue_role(master, principal, with_private=with_private))
        try:
            same = path.read_text() == text
        except FileNotFoundError:
            same = False
        if not same:
            write_private(path, text)
        out[principal] = path
    return out

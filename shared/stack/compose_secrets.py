"""Per-service secrets of the compose stack: what each service's ``/secrets`` holds.

The ``pki`` one-shot writes every secret into the ``secrets`` volume (as root, 0600); then
:func:`write_service_secrets` copies into ``principals/<service>/`` exactly what that service
reads (its own SCRAM password, its own key file issued from the master keyring, the CA, and
the files its settings name), owned by the service user (uid 10001), 0400, folders 0500. Each
service mounts only its folder (a volume ``subpath``), read-only, at ``/secrets``: the gateway
never sees another principal's password, the master keyring or the broker's keystore.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.security.keyfile import KEYS_FILE, encode, issue_role, read_key_file
from shared.topology import SERVICES

SERVICE_UID = 10001  # the image's radstream user (deploy/Dockerfile)
PRINCIPALS_DIR = "principals"

# files a service reads besides its password, key file and the CA: name in its /secrets →
# where pki keeps it in the volume
EXTRA: dict[str, dict[str, str]] = {
    "gateway": {"dicom/gateway.pem": "dicom/gateway.pem", "dicom/gateway.key": "dicom/gateway.key"},
    "worklist": {
        "worklist.pem": "worklist.pem",
        "worklist.key": "worklist.key",
        "worklist-users.json": "worklist-users.json",
    },
}


def service_files(service: str) -> dict[str, str]:
    """Name in the service's ``/secrets`` → source in the volume (``None``-free; the key file
    is issued, not copied: its source is the master keyring)."""
    return {
        f"{service}.password": f"{service}.password",
        KEYS_FILE: "keyring.json",
        "ca.pem": "ca.pem",
        **EXTRA.get(service, {}),
    }


def write_service_secrets(out: Path, uid: int = SERVICE_UID, gid: int = SERVICE_UID) -> list[Path]:
    """Write ``out/principals/<service>/`` for every service of the topology; returns the
    folders. Idempotent (rewrites the files)."""
    master = read_key_file(out / "keyring.json")
    folders = []
    for svc in SERVICES:
        folder = out / PRINCIPALS_DIR / svc.name
        for name, source in service_files(svc.name).items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = (
                encode(issue_role(master, svc.principal)).encode()
                if name == KEYS_FILE
                else (out / source).read_bytes()
            )
            path.unlink(missing_ok=True)
            path.write_bytes(data)
            os.chown(path, uid, gid)
            os.chmod(path, 0o400)
        for sub in sorted({p for p in folder.rglob("*") if p.is_dir()} | {folder}, reverse=True):
            os.chown(sub, uid, gid)
            os.chmod(sub, 0o500)
        folders.append(folder)
    return folders

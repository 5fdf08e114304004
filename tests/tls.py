"""A throw-away PKI for TLS attack tests: a CA, certificates it signs, and a rogue CA."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(out: Path, leaves: dict[str, tuple[str, str]]) -> dict[str, Path]:
    """CAs ``ca`` and ``rogue-ca``, and one certificate per ``leaves`` entry
    (name → (issuing CA, extension lines)). Returns ``{"<name>_pem"|"<name>_key": path}``."""
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-sha256",
            "-keyout", str(out / f"{ca}.key"), "-out", str(out / f"{ca}.pem"),
            "-subj", f"/CN={ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    for name, (ca, ext) in leaves.items():
        (out / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", str(out / f"{name}.key"),
            "-out", str(out / f"{name}.csr"), "-subj", f"/CN={name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(out / f"{name}.csr"), "-CA", str(out / f"{ca}.pem"),
            "-CAkey", str(out / f"{ca}.key"), "-CAcreateserial", "-days", "2", "-sha256",
            "-extfile", str(out / f"{name}.ext"), "-out", str(out / f"{name}.pem"),
        )  # fmt: skip
    return {p.stem.replace("-", "_") + p.suffix.replace(".", "_"): p for p in out.iterdir()}


SERVER = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
CLIENT = "extendedKeyUsage=clientAuth"

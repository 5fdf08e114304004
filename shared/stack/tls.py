"""Server certificates from the local stack's development CA (``deploy/kafka/certs.sh`` makes
the CA; ``<home>/secrets/tls/ca.pem`` + ``ca.key``): the broker's comes from the script, the
worklist's HTTPS certificate from :func:`issue_server_cert`. Subject alternative names cover
127.0.0.1 and localhost, as clients check host names."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 397  # what browsers accept for a TLS server certificate


def issue_server_cert(tls_dir: Path, name: str) -> tuple[Path, Path]:
    """``<tls_dir>/<name>.pem`` (certificate + CA) and ``<name>.key`` (0600), signed by the
    CA in ``tls_dir``; an existing pair is kept while it has 30 days or more to run."""
    cert_path, key_path = tls_dir / f"{name}.pem", tls_dir / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        left = current.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if left > dt.timedelta(days=30):
            return cert_path, key_path
    ca_pem = (tls_dir / "ca.pem").read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError("the development CA key is neither RSA nor EC")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    return cert_path, key_path

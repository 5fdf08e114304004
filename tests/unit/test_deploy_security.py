"""Attack tests on the rendered deployment (issue 14): the compose broker's controller listener
is authenticated with no anonymous super user, and its certificate carries the name ``kafka``
every client of the compose network connects to (a TLS handshake to ``kafka`` succeeds with
hostname checking on; before, only ``localhost``/``127.0.0.1`` were on it and compose turned
the broker's endpoint identification off)."""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

import yaml

from services.gateway.core import check_settings
from shared.config import GatewaySettings
from shared.stack.broker import CONTROLLER_PRINCIPAL, LocalBroker
from tests.helpers import REPO


def _compose_kafka_env() -> dict[str, str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return {k: str(v) for k, v in compose["services"]["kafka"]["environment"].items()}


def test_compose_controller_listener_is_authenticated_and_nobody_anonymous_is_super() -> None:
    env = _compose_kafka_env()
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert protocols[env["KAFKA_CONTROLLER_LISTENER_NAMES"]] == "SASL_SSL"
    assert "PLAINTEXT" not in protocols.values()
    supers = set(env["KAFKA_SUPER_USERS"].split(";"))
    assert supers == {"User:admin", f"User:{CONTROLLER_PRINCIPAL}"}
    assert env["KAFKA_SASL_MECHANISM_CONTROLLER_PROTOCOL"] == "PLAIN"
    assert env["KAFKA_LISTENER_NAME_CONTROLLER_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    # the JAAS line comes from the secrets volume, never from the compose file
    jaas = env["KAFKA_LISTENER_NAME_CONTROLLER_PLAIN_SASL_JAAS_CONFIG"]
    assert jaas == "$${file:/secrets/controller.properties:jaas}"  # compose: $$ is one $
    assert "FileConfigProvider" in env["KAFKA_CONFIG_PROVIDERS_FILE_CLASS"]
    assert "KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM" not in env  # hostname checks stay on
    pki = (REPO / "deploy" / "compose" / "pki.sh").read_text()
    assert "controller.properties" in pki and "endpoint.identification.algorithm=" not in pki
    assert "os.chmod(controller, 0o400)" in pki  # the broker's secret only


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake in memory: ``client`` connects to ``server`` by ``name``."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=name)
    done = {"c": False, "s": False}
    for _ in range(20):
        for key, end in (("c", cli), ("s", srv)):
            if not done[key]:
                try:
                    end.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_compose_broker_certificate_answers_to_kafka(tmp_path: Path) -> None:
    pki = (REPO / "deploy" / "compose" / "pki.sh").read_text()
    sans = re.search(r"extra_sans=\(([^)]*)\)", pki)
    assert sans is not None, "pki.sh gives the broker certificate no extra names"
    extra = tuple(s.strip().strip("\"'") for s in sans.group(1).split(",") if s.strip())
    broker = LocalBroker(tmp_path, extra_sans=extra)
    broker.ensure_secrets()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(broker.tls_dir / "broker.pem", broker.tls_dir / "broker.key")
    client = ssl.create_default_context(cafile=str(broker.ca_file))
    _handshake(server, client, "kafka")  # the compose clients' bootstrap name
    _handshake(server, client, "localhost")
    try:
        _handshake(server, client, "mallory")
    except ssl.SSLCertVerificationError:
        pass
    else:
        raise AssertionError("the certificate answered to a name it does not carry")


def test_an_older_broker_certificate_without_the_name_is_reissued(tmp_path: Path) -> None:
    LocalBroker(tmp_path).ensure_secrets()  # localhost only, as before
    ca = (tmp_path / "secrets" / "tls" / "ca.pem").read_bytes()
    broker = LocalBroker(tmp_path, extra_sans=("DNS:kafka",))
    broker.ensure_secrets()
    assert broker.ca_file.read_bytes() == ca  # the CA is kept, clients keep trusting it
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(broker.tls_dir / "broker.pem", broker.tls_dir / "broker.key")
    _handshake(server, ssl.create_default_context(cafile=str(broker.ca_file)), "kafka")


def _gateway_envs() -> dict[str, dict[str, str]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    docs = yaml.safe_load_all((REPO / "deploy" / "k8s" / "base" / "deployments.yaml").read_text())
    (k8s,) = [d for d in docs if d and d["metadata"]["name"] == "gateway"]
    (container,) = k8s["spec"]["template"]["spec"]["containers"]
    return {
        "compose": {k: str(v) for k, v in compose["gateway"]["environment"].items()},
        "k8s": {e["name"]: str(e["value"]) for e in container["env"]},
    }


def test_the_deployed_gateways_require_mutual_tls_and_an_address_list() -> None:
    for where, env in _gateway_envs().items():
        settings = GatewaySettings(
            **{
                k.removeprefix("RADSTREAM_GATEWAY__").lower(): v
                for k, v in env.items()
                if k.startswith("RADSTREAM_GATEWAY__")
                and not k.startswith("RADSTREAM_GATEWAY__STOW__")  # nested: test_stow.py
            }
        )
        check_settings(settings)  # would raise without a certificate and a client CA
        assert not settings.plain_dicom and settings.require_client_cert, where
        assert settings.tls_ca is not None and settings.allowed_addresses, where


def test_compose_pki_issues_a_gateway_and_a_modality_certificate_for_mutual_tls(
    tmp_path: Path,
) -> None:
    broker = LocalBroker(tmp_path)
    broker.ensure_secrets()
    out = tmp_path / "dicom"
    script = REPO / "deploy" / "compose" / "dicom-certs.sh"
    subprocess.run(["sh", str(script), str(broker.tls_dir), str(out)], check=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(broker.ca_file))
    server.load_cert_chain(out / "gateway.pem", out / "gateway.key")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(broker.ca_file))
    client.load_cert_chain(out / "modality.pem", out / "modality.key")
    _handshake(server, client, "gateway")
    assert (out / "gateway.key").stat().st_mode & 0o077 == 0

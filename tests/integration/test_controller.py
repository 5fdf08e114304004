"""Attack test (issue 14, high): whoever reaches the KRaft controller port must not administer
the cluster. Before, the controller listener was PLAINTEXT and ``User:ANONYMOUS`` a super user:
Kafka's own ``AclCommand --bootstrap-controller`` with no credentials created an ACL granting
everything. Now the listener is SASL_SSL (PLAIN, one principal only the broker holds): without
TLS, without credentials or with a wrong password the same command fails and no ACL appears;
with the broker's credentials it works (the listener is up and the command itself is sound).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shared.stack.broker import CONTROLLER_PRINCIPAL, LocalBroker

pytestmark = pytest.mark.integration

TIMEOUTS = "request.timeout.ms=4000\ndefault.api.timeout.ms=8000\nsocket.connection.setup.timeout.ms=2000\n"


def acl_command(broker: LocalBroker, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = broker._java(
        "org.apache.kafka.tools.AclCommand",
        "--bootstrap-controller",
        f"127.0.0.1:{broker.controller_port}",
        "--command-config",
        str(config),
        *args,
    )
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def grant_everything(
    broker: LocalBroker, config: Path, who: str
) -> subprocess.CompletedProcess[str]:
    return acl_command(
        broker,
        config,
        "--add",
        "--allow-principal",
        f"User:{who}",
        "--operation",
        "All",
        "--topic",
        "*",
        "--force",
    )


def sasl_ssl(broker: LocalBroker, password: str) -> str:
    return (
        "security.protocol=SASL_SSL\nsasl.mechanism=PLAIN\n"
        "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{CONTROLLER_PRINCIPAL}" password="{password}";\n'
        f"ssl.truststore.type=PEM\nssl.truststore.location={broker.ca_file}\n"
    )


def test_the_controller_port_refuses_anonymous_and_wrong_credentials(
    broker: LocalBroker, tmp_path: Path
) -> None:
    props = (broker.kafka_dir / "server.properties").read_text()
    assert "ANONYMOUS" not in props and "PLAINTEXT" not in props
    assert broker.controller_password() not in props  # read through a config provider

    attacks = {
        "plaintext, anonymous": "security.protocol=PLAINTEXT\n",
        "TLS, no credentials": (
            f"security.protocol=SSL\nssl.truststore.type=PEM\n"
            f"ssl.truststore.location={broker.ca_file}\n"
        ),
        "SASL_SSL, wrong password": sasl_ssl(broker, "not-the-password"),
    }
    for n, (what, config) in enumerate(attacks.items()):
        path = tmp_path / f"attack{n}.properties"
        path.write_text(config + TIMEOUTS)
        res = grant_everything(broker, path, f"mallory{n}")
        assert res.returncode != 0, f"{what}: the controller accepted an ACL change"

    good = tmp_path / "controller.properties"
    patient = "request.timeout.ms=20000\ndefault.api.timeout.ms=90000\n"  # a loaded machine
    good.write_text(sasl_ssl(broker, broker.controller_password()) + patient)
    listed = acl_command(broker, good, "--list", "--topic", "*")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "mallory" not in listed.stdout  # no attack left an ACL behind

#!/bin/sh
# One-shot bootstrap of the compose stack's secrets volume: CA + broker keystore, SCRAM
# passwords (one file per principal, 0600), the master keyring, each service's own folder
# principals/<service>/ (uid 10001, 0400: what it mounts at /secrets), the broker's start script (formats
# KRaft storage with the SCRAM users) and the admin client config. Idempotent.
set -eu
out=/secrets
cd /app
python - <<'PY'
import json, os
from pathlib import Path
from shared.stack.broker import LocalBroker
from shared.security.envelope import init_keyring_file
home = Path("/tmp/pki")
b = LocalBroker(home, port=9093, controller_port=9094, extra_sans=("DNS:kafka",))
b.ensure_secrets()
out = Path("/secrets")
for name, pw in b.credentials().items():
    p = out / f"{name}.password"
    p.write_text(pw)
    os.chmod(p, 0o600)  # root's: each service gets its own copy under principals/
for f in ("ca.pem", "broker.p12", "store.password"):
    (out / f).write_bytes((b.tls_dir / f).read_bytes())
# the gateway's DICOM TLS certificate and one modality client certificate (mutual TLS)
import subprocess
subprocess.run(["sh", "/app/deploy/compose/dicom-certs.sh", str(b.tls_dir), str(out / "dicom")], check=True)
# the KRaft controller listener's JAAS line, read by the broker's FileConfigProvider
# (only the broker reads it: apache/kafka runs as appuser, uid 1000)
controller = out / "controller.properties"
controller.write_bytes(b._controller_secret().read_bytes())
os.chown(controller, 1000, 1000)
os.chmod(controller, 0o400)
init_keyring_file(out / "keyring.json")
# the worklist's HTTPS certificate (development CA) and first accounts (random passwords,
# readable by root only in worklist-passwords.json; add others with shared.security.accounts)
from shared.stack.tls import issue_server_cert
from shared.security.accounts import ROLES, add_user
import secrets
cert, key = issue_server_cert(b.tls_dir, "worklist")
for src, dst in ((cert, "worklist.pem"), (key, "worklist.key")):
    (out / dst).write_bytes(src.read_bytes())
    os.chmod(out / dst, 0o640)
if not (out / "worklist-users.json").exists():
    pw = {role: secrets.token_urlsafe(18) for role in ROLES}
    for role, p in pw.items():
        add_user(out / "worklist-users.json", role, role, p)
    os.chmod(out / "worklist-users.json", 0o640)
    (out / "worklist-passwords.json").write_text(json.dumps(pw, indent=2))
    os.chmod(out / "worklist-passwords.json", 0o600)
from shared.stack import principals
admin_pw = b.credentials()["admin"]
(out / "admin.properties").write_text(
    "bootstrap.servers=kafka:9093\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n"
    "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
    f'username="admin" password="{admin_pw}";\n'
    "ssl.truststore.type=PEM\nssl.truststore.location=/secrets/ca.pem\n"
)
(out / "spec.tsv").write_text(principals.spec("radstream.", 3))
# each service's own /secrets (shared/stack/compose_secrets.py): its password, its key file
# (only the keys its role needs), the CA and the files it names; uid 10001, 0400
from shared.stack.compose_secrets import write_service_secrets
write_service_secrets(out)
# read by kafka-init / the broker (apache/kafka runs as appuser, uid 1000), nobody else
os.chown(out / "admin.properties", 1000, 1000)
os.chmod(out / "admin.properties", 0o400)
users = " ".join(f"--add-scram SCRAM-SHA-512=[name={n},password={p}]" for n, p in b.credentials().items())
(out / "kafka-format.sh").write_text(
    "#!/bin/sh\nset -e\n"
    "[ -f /var/lib/kafka/data/meta.properties ] || /opt/kafka/bin/kafka-storage.sh format "
    f"--cluster-id=$CLUSTER_ID -c /opt/kafka/config/server.properties {users}\n"
)
PY
echo "secrets ready in $out"

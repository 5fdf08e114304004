"""A real single-node Apache Kafka broker (KRaft) run as a local process.

Everything lives under one home folder::

    <home>/kafka/        server.properties, data, broker.log, broker.pid
    <home>/secrets/      0700: credentials.json (every SCRAM password: the administrator's,
                         0600), keyring.json (the master keyring), tls/ (development CA and
                         broker keystore), admin.properties, and principals/<name>/ with one
                         principal's own password and key file (0600 each)

No password is ever put on a command line or in a service's environment: the storage tool gets
salted SCRAM credentials, services read ``RADSTREAM_KAFKA__PASSWORD_FILE``, a password change
(:meth:`LocalBroker.set_password`) reaches the broker in a 0600 file.

Listeners: SASL_SSL (SCRAM-SHA-512) on 127.0.0.1 for every client; the KRaft controller
listener is SASL_SSL too, with SASL/PLAIN (KRaft controllers cannot read SCRAM credentials from
the metadata they serve) for one principal, ``controller``, whose password only the broker
holds (``secrets/controller.password``, 0600). ``super.users`` is the administrator and that
principal: no ``User:ANONYMOUS``, so a client that reaches the controller port without the
password can neither create ACLs, delete topics nor change SCRAM credentials.
"""

from __future__ import annotations

import base64
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from shared.config import KafkaSettings
from shared.security.keyfile import write_private
from shared.security.scram import salted_credential
from shared.stack import principals

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kafka"
DEFAULT_CACHE = REPO / ".cache" / "kafka"


class BrokerError(RuntimeError):
    """The broker could not be installed, configured or started."""


_GIVEN: set[int] = set()  # ports this process has handed out


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' source ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_CLAIMS = Path(tempfile.gettempdir()) / "radstream-ports"


def _claim(port: int) -> bool:
    """Claim ``port`` machine-wide for this process's lifetime: a file named after it, holding
    our pid, created exclusively. Another live process's claim is respected; a dead one's is
    taken over. Between ``free_port``'s bind check and the service's own bind, another test
    worker (or another checkout's tests) could otherwise pick the same free port: seen, a
    stage that died on "address already in use" while the other process answered its
    readiness probe."""
    PORT_CLAIMS.mkdir(mode=0o700, exist_ok=True)
    path = PORT_CLAIMS / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                pid = int(path.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                return False
            path.unlink(missing_ok=True)  # a dead process's claim (or a torn write): retry
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def free_port() -> int:
    """A port to listen on, chosen below the kernel's ephemeral range: between this check and
    the listener's bind, no outgoing connection can take it as its source port (seen: a
    service's metrics port taken by a Kafka client's connection while tests ran in parallel).
    Random, never the same twice here, and claimed machine-wide (``_claim``) so that parallel
    test workers never hand out the same one."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randint(max(1025, low - 12000), max(1025, low - 1))
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # the range is exhausted: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def spawn_detached(
    argv: list[str], log_file: Path, env: dict[str, str] | None = None
) -> tuple[int, int]:
    """Start a long-running process in its own session, output appended to ``log_file``.

    Returns (pid, log offset at start). Uses posix_spawn rather than Popen: the process is
    meant to outlive the Popen object (``radstream stack up`` exits, the broker stays)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        pid = os.posix_spawnp(
            argv[0],
            argv,
            env if env is not None else dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)
        os.close(devnull)
    return pid, offset


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        # reap it if it is our own child that exited
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


CONTROLLER_PRINCIPAL = "controller"


def controller_jaas(password: str) -> str:
    """The controller listener's JAAS line: one user, the broker itself (its client side
    reaches the controller with the same credentials)."""
    return (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{CONTROLLER_PRINCIPAL}" password="{password}" '
        f'user_{CONTROLLER_PRINCIPAL}="{password}";'
    )


def controller_listener(secret_file: Path | str) -> dict[str, str]:
    """Broker properties that authenticate the KRaft controller listener (named
    ``CONTROLLER``, mapped to SASL_SSL): SASL/PLAIN whose JAAS line is read by Kafka's
    FileConfigProvider from ``secret_file`` (key ``jaas``, see :func:`controller_jaas`), so the
    password is in no properties file and no environment (compose does the same)."""
    return {
        "config.providers": "file",
        "config.providers.file.class": "org.apache.kafka.common.config.provider.FileConfigProvider",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": f"${{file:{secret_file}:jaas}}",
    }


@dataclass
class LocalBroker:
    home: Path
    port: int = 19093
    controller_port: int = 19094
    heap: str = "512m"
    cache: Path = DEFAULT_CACHE
    extra_sans: tuple[str, ...] = ()  # more names on the broker certificate ("DNS:kafka")

    # ---- paths -------------------------------------------------------------------------
    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def tls_dir(self) -> Path:
        return self.secrets_dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def log_file(self) -> Path:
        return self.kafka_dir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.kafka_dir / "broker.pid"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def classpath(self) -> str:
        return str(self.cache / "lib" / "*")

    # ---- install and secrets --------------------------------------------------------------
    def fetch(self) -> None:
        env = {**os.environ, "KAFKA_CACHE": str(self.cache)}
        res = subprocess.run([str(DEPLOY / "fetch.sh")], env=env, check=False)
        if res.returncode != 0:
            raise BrokerError("fetching Apache Kafka from Maven Central failed")

    def credentials(self) -> dict[str, str]:
        """SCRAM passwords by principal; generated once, stored 0600."""
        path = self.secrets_dir / "credentials.json"
        if path.exists():
            creds: dict[str, str] = json.loads(path.read_text())
        else:
            creds = {}
        missing = [p for p in principals.PRINCIPALS if p not in creds]
        if missing:
            creds.update({p: secrets.token_urlsafe(24) for p in missing})
            _write_secret(path, json.dumps(creds, indent=2))
        return creds

    @property
    def principals_dir(self) -> Path:
        return self.secrets_dir / "principals"

    def password_file(self, principal: str) -> Path:
        """The file a service running as ``principal`` reads its password from (0600)."""
        path = self.principals_dir / principal / "password"
        password = self.credentials()[principal]
        try:
            current = path.read_text()
        except FileNotFoundError:
            current = None
        if current != password:
            write_private(path, password)
        return path

    def set_password(self, principal: str, password: str) -> None:
        """Change a principal's SCRAM password on the running broker (as the administrator;
        the new password travels in a 0600 file, never on a command line), then in the
        stack's store and the principal's password file. Connections already open stay up;
        new ones need the new password."""
        if principal == principals.ADMIN:
            raise BrokerError("the administrator's password is set at format time only")
        creds = self.credentials()
        if principal not in creds:
            raise BrokerError(f"no principal {principal!r}")
        # the password travels in a 0600 java argument file, never on a command line
        res = self._run_java_secret(
            "kafka.admin.ConfigCommand",
            "--bootstrap-server",
            self.bootstrap_servers,
            "--command-config",
            str(self._admin_properties()),
            "--alter",
            "--entity-type",
            "users",
            "--entity-name",
            principal,
            "--add-config",
            f"SCRAM-SHA-512=[iterations=8192,password={password}]",
        )
        if res.returncode != 0:
            raise BrokerError(f"changing the SCRAM password failed: {res.stderr[-2000:]}")
        creds[principal] = password
        _write_secret(self.secrets_dir / "credentials.json", json.dumps(creds, indent=2))
        self.password_file(principal)

    def controller_password(self) -> str:
        """The KRaft controller listener's SASL/PLAIN password; generated once, stored 0600."""
        path = self.secrets_dir / "controller.password"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _controller_secret(self) -> Path:
        path = self.secrets_dir / "controller.properties"
        jaas = controller_jaas(self.controller_password()).replace("\\", "\\\\")
        _write_secret(path, f"jaas={jaas}\n")
        return path

    def _store_password(self) -> str:
        path = self.tls_dir / "store.password"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    def ensure_secrets(self) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.secrets_dir, 0o700)
        self.credentials()
        res = subprocess.run(
            [
                str(DEPLOY / "certs.sh"),
                str(self.tls_dir),
                self._store_password(),
                ",".join(self.extra_sans),
            ],
            check=False,
        )
        if res.returncode != 0:
            raise BrokerError("generating the development CA and broker certificate failed")

    def settings_for(self, principal: str) -> KafkaSettings:
        """Client settings for one principal of this broker."""
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            username=principal,
            password=SecretStr(self.credentials()[principal]),
            ca_file=self.ca_file,
        )

    def env_for(self, principal: str) -> dict[str, str]:
        """``RADSTREAM_KAFKA__*`` variables for a service process running as ``principal``:
        the password is in a 0600 file the variables name, never in the environment."""
        return {
            "RADSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "RADSTREAM_KAFKA__USERNAME": principal,
            "RADSTREAM_KAFKA__PASSWORD_FILE": str(self.password_file(principal)),
            "RADSTREAM_KAFKA__CA_FILE": str(self.ca_file),
        }

    # ---- configuration --------------------------------------------------------------------
    def _server_properties(self) -> str:
        admin_pw = self.credentials()[principals.ADMIN]
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{principals.ADMIN}" password="{admin_pw}";'
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"SASL_SSL://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SASL_SSL",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            **controller_listener(self._controller_secret()),
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(self.tls_dir / "broker.p12"),
            "ssl.keystore.password": self._store_password(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "ssl.client.auth": "none",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{principals.ADMIN};User:{CONTROLLER_PRINCIPAL}",
            "allow.everyone.if.no.acl.found": "false",
            "auto.create.topics.enable": "false",
            "log.dirs": str(self.kafka_dir / "data"),
            "num.partitions": "3",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": "16777216",
            "replica.fetch.max.bytes": "16777216",
            "log.retention.check.interval.ms": "60000",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _admin_properties(self) -> Path:
        path = self.secrets_dir / "admin.properties"
        admin_pw = self.credentials()[principals.ADMIN]
        text = (
            f"bootstrap.servers={self.bootstrap_servers}\n"
            "security.protocol=SASL_SSL\n"
            "sasl.mechanism=SCRAM-SHA-512\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{principals.ADMIN}" password="{admin_pw}";\n'
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={self.ca_file}\n"
        )
        _write_secret(path, text)
        return path

    def _java(self, *args: str, log: Path | None = None) -> list[str]:
        cfg = DEPLOY / "log4j2.yaml"
        return [
            "java",
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={cfg}",
            "-cp",
            self.classpath,
            *args,
        ]

    def _run_java_secret(self, main: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a Kafka tool whose arguments carry secrets: main class and arguments go in a 0600
        java argument file (``java @file``), so ``/proc/<pid>/cmdline`` (readable by every
        local user) shows the file's name, never a password or salted password."""
        argfile = self.secrets_dir / f".args-{os.urandom(4).hex()}"
        quoted = ('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"' for a in (main, *args))
        write_private(argfile, "\n".join(quoted) + "\n")
        try:
            cmd = [*self._java(), f"@{argfile}"]
            return subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            argfile.unlink(missing_ok=True)

    def format_storage(self) -> None:
        props = self.kafka_dir / "server.properties"
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        _write_secret(props, self._server_properties())
        if (self.kafka_dir / "data" / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        scram = []
        for name, pw in self.credentials().items():
            # salted (RFC 5802 SaltedPassword): the passwords themselves never reach argv
            scram += ["--add-scram", salted_credential(name, pw)]
        res = self._run_java_secret(
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(props),
            *scram,
        )
        if res.returncode != 0:
            # never echo the command: it carries passwords
            raise BrokerError(f"formatting KRaft storage failed: {res.stderr[-2000:]}")

    # ---- lifecycle ------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 120.0) -> None:
        """Install, configure and start the broker; no-op when it already runs."""
        if self.is_running():
            self.wait_ready(timeout)
            return
        self.fetch()
        self.ensure_secrets()
        self.format_storage()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        pid, offset = spawn_detached(
            self._java("kafka.Kafka", str(self.kafka_dir / "server.properties")), self.log_file
        )
        self.pid_file.write_text(str(pid))
        self._ready_from = offset
        self.wait_ready(timeout)

    _ready_from: int = 0

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is None:
                raise BrokerError(f"broker exited during start-up; see {self.log_file}")
            with open(self.log_file, "rb") as fh:
                fh.seek(self._ready_from)
                if b"Kafka Server started" in fh.read() or self._port_open():
                    if self._port_open():
                        return
            time.sleep(0.2)
        raise BrokerError(f"broker not ready after {timeout:.0f}s; see {self.log_file}")

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def bootstrap(self, prefix: str = "radstream.", partitions: int = 3) -> None:
        """Create every topic and ACL of the access matrix under ``prefix`` (idempotent)."""
        spec_file = self.kafka_dir / f"bootstrap-{prefix.strip('.') or 'default'}.tsv"
        spec_file.write_text(principals.spec(prefix, partitions))
        cmd = self._java(
            str(DEPLOY / "Bootstrap.java"), str(self._admin_properties()), str(spec_file), prefix
        )
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BrokerError(f"creating topics and ACLs failed: {res.stderr[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid is None:
            return
        terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

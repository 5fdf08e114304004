"""The local stack: the broker plus every service that exists, as background processes.

State, data, logs and secrets live under one folder (``.radstream/`` in the checkout by
default). ``up`` is idempotent (what already runs is left alone) and returns only when every
service answers ``/readyz`` and the gateway accepts a DICOM association (C-ECHO), or raises
:class:`StackError` naming the service that did not come up, with the end of its log.

Which services exist, as whom they run and on which ports come from :mod:`shared.topology`.
Ports can be moved for a second stack beside a first (tests): ``RADSTREAM_STACK_PORTS=auto``
picks free ones at ``up``; ``RADSTREAM_STACK_KAFKA_PORT`` / ``..._CONTROLLER_PORT`` pin the
broker's. Whatever ``up`` chose is kept in ``<home>/run/ports.json`` for the commands after it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared import topology
from shared.config import KafkaSettings
from shared.security.accounts import ROLES, add_user
from shared.security.envelope import init_keyring_file
from shared.security.kafka import client_kwargs
from shared.security.keyfile import issue_all, principal_key_file
from shared.stack.broker import REPO, LocalBroker, _pid_alive, free_port, spawn_detached, terminate
from shared.stack.tls import issue_server_cert
from shared.topology import Service

DEFAULT_HOME = REPO / ".radstream"
PARTITIONS = 3
READY_TIMEOUT_S = 180.0
ECHO_AE_TITLE = "ECHOSCU"  # the calling AE of the readiness C-ECHO (allowed by default)

# Every service RadStream knows, in pipeline order; ``up`` starts those whose module exists.
SERVICES: tuple[Service, ...] = topology.SERVICES


class StackError(RuntimeError):
    """A service of the stack did not come up; ``log_tail`` is the end of its log."""

    def __init__(self, service: str, why: str, log_tail: str) -> None:
        super().__init__(f"{service} did not come up: {why}")
        self.service = service
        self.why = why
        self.log_tail = log_tail


@dataclass(frozen=True)
class StackPorts:
    kafka: int
    controller: int
    gateway_dicom: int
    orthanc_http: int
    orthanc_dicom: int
    metrics: dict[str, int] = field(default_factory=dict)  # service name → /metrics port
    worklist_https: int = topology.PORTS.worklist_https
    gateway_stow: int = topology.PORTS.gateway_stow

    @classmethod
    def defaults(cls) -> StackPorts:
        p = topology.PORTS
        return cls(
            p.kafka,
            p.controller,
            p.gateway_dicom,
            p.orthanc_http,
            p.orthanc_dicom,
            {s.name: s.metrics_port for s in SERVICES},
            p.worklist_https,
            p.gateway_stow,
        )

    @classmethod
    def free(cls) -> StackPorts:
        return cls(
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            {s.name: free_port() for s in SERVICES},
            free_port(),
            free_port(),
        )


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def available_services() -> list[Service]:
    return [s for s in SERVICES if _exists(s.module)]


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log (empty when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalStack:
    def __init__(self, home: Path = DEFAULT_HOME, prefix: str = "radstream.") -> None:
        self.home = home.resolve()
        self.prefix = prefix
        self.ports = self._resolve_ports()
        self.broker = LocalBroker(
            self.home, port=self.ports.kafka, controller_port=self.ports.controller
        )

    # ---- ports --------------------------------------------------------------------------
    @property
    def ports_file(self) -> Path:
        return self.home / "run" / "ports.json"

    def _resolve_ports(self) -> StackPorts:
        try:
            ports = StackPorts(**json.loads(self.ports_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            auto = os.environ.get("RADSTREAM_STACK_PORTS", "") == "auto"
            ports = StackPorts.free() if auto else StackPorts.defaults()
        pinned = {
            "kafka": os.environ.get("RADSTREAM_STACK_KAFKA_PORT"),
            "controller": os.environ.get("RADSTREAM_STACK_CONTROLLER_PORT"),
        }
        changes = {k: int(v) for k, v in pinned.items() if v}
        if changes:
            ports = StackPorts(**{**asdict(ports), **changes})
        return ports

    def metrics_port(self, svc: Service) -> int:
        return self.ports.metrics.get(svc.name, svc.metrics_port)

    @property
    def keyring_path(self) -> Path:
        """The master keyring: the key administrator's, never given to a service."""
        return self.home / "secrets" / "keyring.json"

    def key_file(self, principal: str) -> Path:
        """``principal``'s own key file (what its role may open and seal, 0600)."""
        return principal_key_file(self.broker.principals_dir, principal)

    def issue_keys(self) -> None:
        """The master keyring (created once), then every principal's key file from it."""
        init_keyring_file(self.keyring_path)
        issue_all(self.keyring_path, self.broker.principals_dir)

    @property
    def worklist_users(self) -> Path:
        return self.home / "secrets" / "worklist-users.json"

    @property
    def worklist_passwords(self) -> Path:
        return self.home / "secrets" / "worklist-passwords.json"

    def prepare_worklist(self) -> str:
        """The worklist's HTTPS certificate (from the development CA) and, the first time, a
        clinician and an operator account with random passwords, written 0600 beside the
        argon2id hashes for whoever runs the stack."""
        issue_server_cert(self.broker.tls_dir, "worklist")
        if not self.worklist_users.exists():
            passwords = {role: secrets.token_urlsafe(18) for role in ROLES}
            for role, password in passwords.items():
                add_user(self.worklist_users, role, role, password)
            fd = os.open(self.worklist_passwords, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(passwords, indent=2))
        return (
            f"worklist: https://127.0.0.1:{self.ports.worklist_https} "
            f"(accounts in {self.worklist_passwords})"
        )

    @property
    def stow_token_file(self) -> Path:
        return self.home / "secrets" / "stow-token"

    def prepare_stow(self) -> str:
        """The gateway's STOW-RS certificate (from the development CA) and, the first time, a
        bearer token for the local sender ``local`` (0600; the gateway gets only its hash)."""
        issue_server_cert(self.broker.tls_dir, "gateway-stow")
        if not self.stow_token_file.exists():
            self.stow_token_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.stow_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        return (
            f"STOW-RS: https://127.0.0.1:{self.ports.gateway_stow}/dicom-web/studies "
            f"(bearer token in {self.stow_token_file}, CA {self.broker.tls_dir / 'ca.pem'})"
        )

    def _stow_env(self) -> dict[str, str]:
        """The gateway's STOW-RS settings, once :meth:`prepare_stow` made its files."""
        cert = self.broker.tls_dir / "gateway-stow.pem"
        if not (self.stow_token_file.exists() and cert.exists()):
            return {}
        digest = hashlib.sha256(self.stow_token_file.read_text().strip().encode()).hexdigest()
        section = "RADSTREAM_GATEWAY__STOW__"
        return {
            f"{section}PORT": str(self.ports.gateway_stow),
            f"{section}TLS_CERT": str(cert),
            f"{section}TLS_KEY": str(self.broker.tls_dir / "gateway-stow.key"),
            f"{section}SENDERS": json.dumps([{"name": "local", "token_sha256": digest}]),
        }

    def _pid_file(self, svc: Service) -> Path:
        return self.home / "run" / f"{svc.name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def service_pid(self, svc: Service) -> int | None:
        try:
            pid = int(self._pid_file(svc).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def operator_settings(self) -> KafkaSettings:
        return self.broker.settings_for("operator")

    def service_env(self, svc: Service) -> dict[str, str]:
        """The environment ``up`` starts ``svc`` with: its topology defaults, then the caller's
        environment, then what the stack decides (credentials, folder, prefix, ports)."""
        env = dict(svc.env)
        env.update({k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_KAFKA__")})
        env.update(self.broker.env_for(svc.principal))
        env["RADSTREAM_KEYRING_FILE"] = str(self.key_file(svc.principal))
        if svc.name == "gateway":
            env.setdefault("RADSTREAM_GATEWAY__PORT", str(self.ports.gateway_dicom))
            for name, value in self._stow_env().items():
                env.setdefault(name, value)
        if svc.name == "worklist":
            section = "RADSTREAM_WORKLIST__"
            env.setdefault(f"{section}PORT", str(self.ports.worklist_https))
            env[f"{section}TLS_CERT"] = str(self.broker.tls_dir / "worklist.pem")
            env[f"{section}TLS_KEY"] = str(self.broker.tls_dir / "worklist.key")
            env[f"{section}USERS_FILE"] = str(self.worklist_users)
        if svc.stage is not None and "pacs" in svc.stage.delivers and shutil.which("Orthanc"):
            section = f"RADSTREAM_{svc.name.upper()}__"
            env.setdefault(f"{section}PACS_HOST", "127.0.0.1")
            env.setdefault(f"{section}PACS_PORT", str(self.ports.orthanc_dicom))
        env.update(
            {
                "RADSTREAM_HOME": str(self.home),
                "RADSTREAM_TOPIC_PREFIX": self.prefix,
                "RADSTREAM_METRICS_PORT": str(self.metrics_port(svc)),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    # ---- up / down ------------------------------------------------------------------------
    def up(self, timeout: float = READY_TIMEOUT_S) -> list[str]:
        """Start the broker, create topics and ACLs, start missing services, then wait until
        every service is ready (see :meth:`wait_ready`). Returns what was done."""
        actions: list[str] = []
        self.home.mkdir(parents=True, exist_ok=True)
        self.ports_file.parent.mkdir(parents=True, exist_ok=True)
        self.ports_file.write_text(json.dumps(asdict(self.ports), indent=2))
        was_running = self.broker.is_running()
        self.broker.start()
        actions.append("broker already running" if was_running else "broker started")
        self.issue_keys()
        if not was_running:
            self.broker.bootstrap(self.prefix, PARTITIONS)
            actions.append("topics and ACLs in place")
        orthanc = self.start_orthanc()
        if orthanc:
            actions.append(orthanc)
        for svc in available_services():
            if self.service_pid(svc) is not None:
                actions.append(f"{svc.name} already running")
                continue
            if svc.name == "worklist":
                actions.append(self.prepare_worklist())
            if svc.name == "gateway":
                actions.append(self.prepare_stow())
            pid, _ = spawn_detached(
                [sys.executable, "-m", svc.module], self.log_file(svc.name), self.service_env(svc)
            )
            self._pid_file(svc).write_text(str(pid))
            actions.append(f"{svc.name} started (pid {pid})")
        self.wait_ready(timeout)
        actions.append("every service ready")
        return actions

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every available service answers ``/readyz`` (the gateway: accepts a C-ECHO
        association) and Orthanc, if started, answers; :class:`StackError` if one exits or
        is not ready in ``timeout`` seconds."""
        checks: dict[str, tuple[Callable[[], bool], int | None, Path]] = {
            svc.name: (
                functools.partial(self._service_ready, svc),
                self.service_pid(svc),
                self.log_file(svc.name),
            )
            for svc in available_services()
        }
        if self.orthanc_pid() is not None:
            checks["orthanc"] = (
                lambda: _http_ok(self.ports.orthanc_http, "/system"),
                self.orthanc_pid(),
                self.log_file("orthanc"),
            )
        deadline = time.monotonic() + timeout
        pending = dict(checks)
        while pending:
            for name, (ready, pid, log) in list(pending.items()):
                if pid is None or not _pid_alive(pid):
                    raise StackError(name, "its process exited", tail(log))
                if ready():
                    del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                name, (_, _, log) = next(iter(pending.items()))
                raise StackError(name, f"not ready after {timeout:.0f} s", tail(log))
            time.sleep(0.2)  # polling other processes' readiness, not synchronising threads

    def _service_ready(self, svc: Service) -> bool:
        pid = self.service_pid(svc)
        if pid is None or not ready_as(self.metrics_port(svc), pid):
            return False
        return svc.name != "gateway" or self._echo(self.service_env(svc))

    def _echo(self, env: dict[str, str]) -> bool:
        """One C-ECHO association with the gateway, as a modality would open it."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        titles = env.get("RADSTREAM_GATEWAY__ALLOWED_AE_TITLES", "")
        allowed = [t.strip() for t in titles.split(",")]
        calling = ECHO_AE_TITLE if ECHO_AE_TITLE in allowed else (allowed[0] or ECHO_AE_TITLE)
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        tls = None
        if env.get("RADSTREAM_GATEWAY__TLS_CERT"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # readiness only: is it answering, not who it is
            tls = (ctx, "")
        assoc = ae.associate(
            "127.0.0.1",
            int(env.get("RADSTREAM_GATEWAY__PORT", self.ports.gateway_dicom)),
            ae_title=env.get("RADSTREAM_GATEWAY__AE_TITLE", topology.GATEWAY_AE_TITLE),
            tls_args=tls,
        )
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        return getattr(status, "Status", None) == 0x0000

    # ---- Orthanc (the PACS results go to), when Debian's package is installed ---------------
    @property
    def orthanc_dir(self) -> Path:
        return self.home / "orthanc"

    def orthanc_pid(self) -> int | None:
        try:
            pid = int((self.orthanc_dir / "orthanc.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def start_orthanc(self) -> str | None:
        """Start Orthanc if installed. It cannot bind to loopback only (1.10), so its HTTP API
        refuses remote access and its DICOM port accepts stores only from the RadStream AE
        at 127.0.0.1 (DicomCheckModalityHost)."""
        exe = shutil.which("Orthanc")
        if exe is None:
            return None
        if self.orthanc_pid() is not None:
            return "orthanc already running"
        self.orthanc_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "radstream-local-pacs",
            "StorageDirectory": str(self.orthanc_dir / "db"),
            "IndexDirectory": str(self.orthanc_dir / "db"),
            "HttpPort": self.ports.orthanc_http,
            "DicomPort": self.ports.orthanc_dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"RADSTREAM": ["RADSTREAM", "127.0.0.1", 104]},
            "Plugins": [],
        }
        (self.orthanc_dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        pid, _ = spawn_detached(
            [exe, str(self.orthanc_dir / "orthanc.json")], self.log_file("orthanc")
        )
        (self.orthanc_dir / "orthanc.pid").write_text(str(pid))
        return f"orthanc started (pid {pid}, http://127.0.0.1:{self.ports.orthanc_http})"

    def down(self, timeout: float = 15.0) -> list[str]:
        actions: list[str] = []
        opid = self.orthanc_pid()
        if opid is not None:
            terminate(opid, timeout)  # SIGTERM, then SIGKILL: never left behind
            actions.append("orthanc stopped")
        for svc in reversed(SERVICES):
            pid = self.service_pid(svc)
            if pid is None:
                continue
            terminate(pid, timeout)
            self._pid_file(svc).unlink(missing_ok=True)
            actions.append(f"{svc.name} stopped")
        if self.broker.is_running():
            self.broker.stop()
            actions.append("broker stopped")
        self.ports_file.unlink(missing_ok=True)
        return actions

    # ---- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        broker_up = self.broker.is_running() and self.broker._port_open()
        services = []
        for svc in available_services():
            pid = self.service_pid(svc)
            port = self.metrics_port(svc)
            services.append(
                {
                    "name": svc.name,
                    "pid": pid,
                    "running": pid is not None,
                    "healthy": pid is not None and _http_ok(port, "/healthz"),
                    "ready": pid is not None and ready_as(port, pid),
                    "metrics": f"http://127.0.0.1:{port}/metrics",
                    "processed": _processed(port) if pid is not None else {},
                }
            )
        lag: dict[str, Any] = {}
        if broker_up:
            lag = asyncio.run(consumer_lag(self.operator_settings(), self.prefix))
        return {
            "home": str(self.home),
            "broker": {"running": broker_up, "bootstrap": self.broker.bootstrap_servers},
            "gateway": {
                "dicom": f"127.0.0.1:{self.ports.gateway_dicom}",
                "stow_rs": f"https://127.0.0.1:{self.ports.gateway_stow}/dicom-web/studies",
            },
            "services": services,
            "lag": lag,
        }


def _processed(port: int) -> dict[str, float]:
    """Records handled so far by outcome, read from the service's own /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("radstream_messages_total{") or line.startswith(
            "radstream_gateway_instances_total{"
        ):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def _http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def ready_as(port: int, pid: int) -> bool:
    """``/readyz`` on ``port`` answers ready *for process* ``pid`` (the answer names its pid):
    another process that holds the port (a stale service, another checkout's test worker) is
    not taken for the one we started."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            body = json.loads(r.read() or b"{}")
            return bool(r.status == 200 and body.get("pid") == pid)
    except (OSError, ValueError):
        return False


async def consumer_lag(kafka: KafkaSettings, prefix: str) -> dict[str, Any]:
    """Per stage and partition: end of input minus the group's committed offset."""
    out: dict[str, Any] = {}
    for stage in topology.STAGES:
        src = stage.input
        consumer = AIOKafkaConsumer(
            group_id=f"{prefix}{stage.name}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            request_timeout_ms=10000,
            **client_kwargs(kafka),
        )
        await consumer.start()
        try:
            tps = [TopicPartition(f"{prefix}{src}", p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            parts = {}
            for tp in tps:
                committed = await consumer.committed(tp) or 0
                parts[str(tp.partition)] = max(0, ends[tp] - committed)
            out[stage.name] = {"input": src, "partitions": parts, "total": sum(parts.values())}
        finally:
            await consumer.stop()
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

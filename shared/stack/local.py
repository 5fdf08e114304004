"""The local stack: the broker plus every service that exists, as background processes.

State, data, logs and secrets live under one folder (``.radstream/`` in the checkout by
default). ``up`` is idempotent: what already runs is left alone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.config import KafkaSettings
from shared.security.envelope import init_keyring_file
from shared.security.kafka import client_kwargs
from shared.stack.broker import REPO, LocalBroker, _pid_alive, spawn_detached, terminate
from shared.stack.principals import STAGES

DEFAULT_HOME = REPO / ".radstream"
PARTITIONS = 3


@dataclass(frozen=True)
class ServiceDef:
    name: str
    module: str
    principal: str
    metrics_port: int
    env: tuple[tuple[str, str], ...] = ()  # defaults, overridden by the caller's environment


# Every service RadStream knows, in pipeline order; ``up`` starts those whose module exists.
SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef(
        "gateway",
        "services.gateway.main",
        "gateway",
        9101,
        (("RADSTREAM_GATEWAY__ALLOWED_AE_TITLES", "STORESCU,ECHOSCU,RADSTREAM-DEMO"),),
    ),
    ServiceDef("ingest", "services.ingest.main", "ingest", 9102),
    ServiceDef("preprocess", "services.preprocess.main", "preprocess", 9103),
    ServiceDef("segmentation", "services.segmentation.main", "segmentation", 9104),
    ServiceDef("alert", "services.alert.main", "alert", 9105),
)


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def available_services() -> list[ServiceDef]:
    return [s for s in SERVICES if _exists(s.module)]


class LocalStack:
    def __init__(self, home: Path = DEFAULT_HOME, prefix: str = "radstream.") -> None:
        self.home = home.resolve()
        self.prefix = prefix
        # ports can be moved (e.g. a second stack beside a test broker)
        self.broker = LocalBroker(
            self.home,
            port=int(os.environ.get("RADSTREAM_STACK_KAFKA_PORT", "19093")),
            controller_port=int(os.environ.get("RADSTREAM_STACK_CONTROLLER_PORT", "19094")),
        )

    @property
    def keyring_path(self) -> Path:
        return self.home / "secrets" / "keyring.json"

    def _pid_file(self, svc: ServiceDef) -> Path:
        return self.home / "run" / f"{svc.name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def service_pid(self, svc: ServiceDef) -> int | None:
        try:
            pid = int(self._pid_file(svc).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def operator_settings(self) -> KafkaSettings:
        return self.broker.settings_for("operator")

    # ---- up / down ------------------------------------------------------------------------
    def up(self) -> list[str]:
        """Start the broker, create topics and ACLs, start missing services. Returns actions."""
        actions: list[str] = []
        self.home.mkdir(parents=True, exist_ok=True)
        was_running = self.broker.is_running()
        self.broker.start()
        actions.append("broker already running" if was_running else "broker started")
        init_keyring_file(self.keyring_path)
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
            env = dict(svc.env)
            env.update(
                {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_KAFKA__")}
            )
            env.update(self.broker.env_for(svc.principal))
            if svc.name == "alert" and shutil.which("Orthanc"):
                env.setdefault("RADSTREAM_ALERT__PACS_HOST", "127.0.0.1")
                env.setdefault("RADSTREAM_ALERT__PACS_PORT", str(self.ORTHANC_DICOM))
            env.update(
                {
                    "RADSTREAM_HOME": str(self.home),
                    "RADSTREAM_TOPIC_PREFIX": self.prefix,
                    "RADSTREAM_METRICS_PORT": str(svc.metrics_port),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            pid, _ = spawn_detached(
                [sys.executable, "-m", svc.module], self.log_file(svc.name), env
            )
            self._pid_file(svc).parent.mkdir(parents=True, exist_ok=True)
            self._pid_file(svc).write_text(str(pid))
            actions.append(f"{svc.name} started (pid {pid})")
        return actions

    # ---- Orthanc (the PACS results go to), when Debian's package is installed ---------------
    ORTHANC_HTTP = 8042
    ORTHANC_DICOM = 4242

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
            "HttpPort": self.ORTHANC_HTTP,
            "DicomPort": self.ORTHANC_DICOM,
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
        return f"orthanc started (pid {pid}, http://127.0.0.1:{self.ORTHANC_HTTP})"

    def down(self, timeout: float = 15.0) -> list[str]:
        actions: list[str] = []
        opid = self.orthanc_pid()
        if opid is not None:
            os.kill(opid, signal.SIGTERM)
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
        return actions

    # ---- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        broker_up = self.broker.is_running() and self.broker._port_open()
        services = []
        for svc in available_services():
            pid = self.service_pid(svc)
            services.append(
                {
                    "name": svc.name,
                    "pid": pid,
                    "running": pid is not None,
                    "healthy": pid is not None and _http_ok(svc.metrics_port, "/healthz"),
                    "ready": pid is not None and _http_ok(svc.metrics_port, "/readyz"),
                    "metrics": f"http://127.0.0.1:{svc.metrics_port}/metrics",
                    "processed": _processed(svc.metrics_port) if pid is not None else {},
                }
            )
        lag: dict[str, Any] = {}
        if broker_up:
            lag = asyncio.run(consumer_lag(self.operator_settings(), self.prefix))
        return {
            "home": str(self.home),
            "broker": {"running": broker_up, "bootstrap": self.broker.bootstrap_servers},
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


async def consumer_lag(kafka: KafkaSettings, prefix: str) -> dict[str, Any]:
    """Per stage and partition: end of input minus the group's committed offset."""
    out: dict[str, Any] = {}
    for stage, (src, _) in STAGES.items():
        consumer = AIOKafkaConsumer(
            group_id=f"{prefix}{stage}",
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
            out[stage] = {"input": src, "partitions": parts, "total": sum(parts.values())}
        finally:
            await consumer.stop()
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

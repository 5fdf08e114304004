"""Test helpers: wait on conditions (never sleep to synchronise), produce and read records,
run a stage as a real subprocess."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel, TypeAdapter

from shared.runtime.codec import Codec
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs
from shared.stack.broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parents[1]


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    """The errors dicom3tools' dciodvfy (an independent validator) finds in a DICOM object."""
    import shutil

    import pytest

    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: 'make setup' installs Debian's dicom3tools")
    path.write_bytes(data)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]


def collect_refused_sockets() -> None:
    """Collect the garbage aiokafka leaves when the broker refuses a client (its SSL socket in a
    reference cycle), with that socket's ResourceWarning silenced: only for tests of refusals,
    whose clients are aiokafka's own, never a service's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_until_sync(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Env:
    """One isolated copy of the stack's topics and ACLs (own prefix) plus a keyring."""

    broker: LocalBroker
    prefix: str
    keyring_path: Path
    keyring: Keyring
    home: Path
    partitions: int = 3

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def codec(self) -> Codec:
        return Codec(self.keyring)

    def kafka(self, principal: str = "admin") -> dict[str, Any]:
        return client_kwargs(self.broker.settings_for(principal))

    def settings(self, principal: str, **overrides: Any) -> Any:
        from shared.config import Settings

        return Settings(
            home=self.home,
            topic_prefix=self.prefix,
            keyring_file=self.keyring_path,
            kafka=self.broker.settings_for(principal),
            **overrides,
        )

    def key_file(self, principal: str) -> Path:
        """``principal``'s own key file, issued from this test's master keyring: a process
        started with :meth:`service_env` holds only the keys its role needs, as deployed."""
        from shared.security.keyfile import issue_all, principal_key_file

        root = self.home / "secrets" / "principals"
        issue_all(self.keyring_path, root)
        return principal_key_file(root, principal)

    def service_env(self, principal: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
        env.update(self.broker.env_for(principal))
        env.update(
            {
                "RADSTREAM_HOME": str(self.home),
                "RADSTREAM_TOPIC_PREFIX": self.prefix,
                "RADSTREAM_KEYRING_FILE": str(self.key_file(principal)),
                "RADSTREAM_METRICS_PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    async def produce(
        self,
        topic: str,
        items: Iterable[tuple[bytes | None, BaseModel]],
        principal: str = "admin",
    ) -> None:
        producer = AIOKafkaProducer(
            enable_idempotence=True, max_request_size=16 * 1024 * 1024, **self.kafka(principal)
        )
        await producer.start()
        try:
            codec = self.codec
            full = self.topic(topic)
            futures = []
            for key, record in items:
                value, headers = codec.encode(full, key, record)
                futures.append(await producer.send(full, value, key=key, headers=headers))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    async def produce_raw(
        self,
        topic: str,
        items: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    ) -> None:
        producer = AIOKafkaProducer(enable_idempotence=True, **self.kafka("admin"))
        await producer.start()
        try:
            for key, value, headers in items:
                await producer.send_and_wait(self.topic(topic), value, key=key, headers=headers)
        finally:
            await producer.stop()


@dataclass
class Reader:
    """A read_committed reader of one topic (all partitions, from the beginning)."""

    env: Env
    topic: str
    model: Any
    principal: str = "admin"
    records: list[Any] = field(default_factory=list)
    raw: list[Any] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Reader:
        full = self.env.topic(self.topic)
        self._consumer = AIOKafkaConsumer(
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 * 1024 * 1024,
            **self.env.kafka(self.principal),
        )
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(full)
        if not parts:  # its real partition count (the audit topics have one)
            await self._consumer._client._wait_on_metadata(full)
            parts = self._consumer.partitions_for_topic(full) or set(range(self.env.partitions))
        tps = [TopicPartition(full, p) for p in sorted(parts)]
        begin = await self._consumer.beginning_offsets(tps)
        self._consumer.assign(tps)  # then seek at once: seek_to_beginning races the fetcher
        for tp in tps:
            self._consumer.seek(tp, begin[tp])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def poll(self) -> int:
        assert self._consumer is not None
        adapter = TypeAdapter(self.model)
        batches = await self._consumer.getmany(timeout_ms=200)
        n = 0
        for recs in batches.values():
            for rec in recs:
                self.raw.append(rec)
                self.records.append(
                    self.env.codec.decode(rec.topic, rec.key, rec.value, rec.headers, adapter)
                )
                n += 1
        return n

    async def wait_for(self, count: int, timeout: float = 60.0) -> list[Any]:
        async def enough() -> bool:
            await self.poll()
            return len(self.records) >= count

        await wait_until(
            enough, timeout, f"{count} records on {self.topic} (have {len(self.records)})"
        )
        return self.records

    async def drain(self, quiet: float = 1.0) -> list[Any]:
        """Read until nothing new arrives for ``quiet`` seconds (used after the writer stopped)."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if await self.poll():
                last = time.monotonic()
        return self.records


async def group_caught_up(env: Env, group: str, topic: str) -> bool:
    """True when the group's committed offsets equal the end of every input partition."""
    consumer = AIOKafkaConsumer(
        group_id=env.topic(group),
        enable_auto_commit=False,
        isolation_level="read_committed",
        **env.kafka(),
    )
    await consumer.start()
    try:
        full = env.topic(topic)
        tps = [TopicPartition(full, p) for p in range(env.partitions)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            if (committed or 0) < ends[tp]:
                return False
        return True
    finally:
        await consumer.stop()


async def group_settled(env: Env, group: str, topic: str) -> bool:
    """True when the group has committed every record of ``topic``. Unlike
    :func:`group_caught_up` it holds for an input written in transactions, where the end offset
    sits past the last commit marker that a consumer's committed offset never covers: what
    lies between the committed offset and the end must be markers only."""
    consumer = AIOKafkaConsumer(
        group_id=env.topic(group),
        enable_auto_commit=False,
        isolation_level="read_committed",
        **env.kafka(),
    )
    reader = AIOKafkaConsumer(
        isolation_level="read_committed", enable_auto_commit=False, **env.kafka()
    )
    await consumer.start()
    await reader.start()
    try:
        full = env.topic(topic)
        tps = [TopicPartition(full, p) for p in range(env.partitions)]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        tail = {}
        for tp in tps:
            committed = await consumer.committed(tp)
            start = begins[tp] if committed is None else committed
            if start < ends[tp]:
                tail[tp] = start
        if not tail:
            return True
        reader.assign(list(tail))
        for tp, start in tail.items():
            reader.seek(tp, start)
        while any([await reader.position(tp) < ends[tp] for tp in tail]):
            batch = await reader.getmany(*tail, timeout_ms=500)
            if any(rec.offset < ends[tp] for tp, recs in batch.items() for rec in recs):
                return False  # a record the group has not committed yet
        return True
    finally:
        await reader.stop()
        await consumer.stop()


# How long a test waits for a service to exit after SIGTERM. The service itself bounds its
# close at ``shutdown_timeout_s`` (8 s), after the batch in flight; the rest is headroom for a
# CI machine running three test workers, their brokers and services on two cores, where the
# results service (nice 10) gets a tenth of a core. CI failed once at 15 s; a stop that hangs
# still fails here, with the service's log.
STOP_BOUND_S = 60.0


def metrics_text(port: int, timeout: float = 5.0) -> str:
    """A service's /metrics page (Prometheus text format)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return str(r.read().decode())


def metric_sum(port: int, name: str) -> float:
    """The sum of a metric's samples on a service's /metrics (0 when none yet, or the service
    does not answer yet)."""
    try:
        text = metrics_text(port, timeout=2.0)
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


class StageProcess:
    """A stage run as its own OS process, as in production."""

    def __init__(self, env: dict[str, str], module: str, log: Path) -> None:
        self.env = env
        self.module = module
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StageProcess:
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        fh.close()
        return self

    @property
    def port(self) -> int:
        return int(self.env["RADSTREAM_METRICS_PORT"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = STOP_BOUND_S) -> int:
        """SIGTERM, then the exit code. A service that has not exited within ``timeout`` fails
        the test with the end of its log (what it was doing), not a bare TimeoutExpired."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            from shared.stack.local import tail

            self.proc.kill()  # not left running into the next test
            self.proc.wait(10)
            raise AssertionError(
                f"{self.module} did not exit within {timeout:.0f} s of SIGTERM; its log ends:\n"
                + tail(self.log, 30)
            ) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """This process answers ``/readyz`` as ready (its own pid in the answer: not another
        process that holds the port). A process that has exited fails the test at once with
        the end of its log, rather than after the caller's whole timeout."""
        from shared.stack.local import ready_as, tail

        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(
                f"{self.module} exited ({code}) before it was ready; its log ends:\n"
                + tail(self.log, 30)
            )
        return ready_as(self.port, self.proc.pid)


class running:
    """Run a StageRunner in this event loop for the duration of an ``async with``."""

    def __init__(self, runner: Any, timeout: float = 60.0) -> None:
        self.runner = runner
        self.timeout = timeout
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Any:
        self.task = asyncio.create_task(self.runner.run())

        async def ready() -> bool:
            if self.task is not None and self.task.done():
                self.task.result()
            return bool(self.runner.ready)

        await wait_until(ready, self.timeout, "stage ready")
        return self.runner

    async def __aexit__(self, *exc: object) -> None:
        self.runner.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


def http_ok(port: int, path: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


RECEIVED_LUA = """
-- Every C-STORE Orthanc receives, duplicates included (the filter runs before its own
-- de-duplication), appended to a file; while the hold file exists the store waits here.
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("%(received)s", "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  local waited = 0
  while waited < 1200 do
    local h = io.open("%(hold)s", "r")
    if h == nil then break end
    h:close()
    os.execute("sleep 0.1")
    waited = waited + 1
  end
  return true
end
"""


class Orthanc:
    """A real Orthanc (Debian's package) for one test: own storage, free ports, HTTP on
    127.0.0.1 only with remote access off; DICOM accepts only the configured modalities.
    :meth:`received` lists every C-STORE it was sent (a Lua filter records them, duplicates
    included); :meth:`hold` makes incoming stores wait until :meth:`release`."""

    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(
        self, root: Path, modalities: dict[str, str], extra: dict[str, Any] | None = None
    ) -> None:
        """``extra``: more configuration; ``{"DicomWeb": {...}}`` loads Debian's DICOMweb
        plugin (orthanc-dicomweb): its server at ``/dicom-web/`` and its STOW-RS client."""
        import json
        import shutil

        self.http_port = free_port()
        self.dicom_port = free_port()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("Orthanc")
        assert exe, "Orthanc not found: 'make setup' installs Debian's orthanc"
        self.exe = exe
        self.received_file = root / "received.txt"
        self.hold_file = root / "hold"
        (root / "received.lua").write_text(
            RECEIVED_LUA % {"received": self.received_file, "hold": self.hold_file}
        )
        config = {
            "Name": "radstream-test-pacs",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {name: [aet, "127.0.0.1", 104] for name, aet in modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            "LuaScripts": [str(root / "received.lua")],
        }
        config.update(extra or {})
        if "DicomWeb" in config:
            assert Path(self.DICOMWEB_PLUGIN).exists(), (
                "Orthanc's DICOMweb plugin not found: 'make setup' installs orthanc-dicomweb"
            )
            config["Plugins"] = [self.DICOMWEB_PLUGIN]
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        log = open(self.root / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            [self.exe, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (
                f"Orthanc exited; see {self.root / 'orthanc.log'}"
            )
            return self.get("/system") is not None

        wait_until_sync(up, 30, "Orthanc up")
        return self

    def get(self, path: str) -> Any:
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def post(self, path: str, body: bytes, timeout: float = 120) -> tuple[int, Any]:
        """POST to Orthanc's REST API: (HTTP status, parsed JSON answer or text)."""
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text.decode(errors="replace")

    def instances(self) -> list[dict[str, Any]]:
        ids = self.get("/instances") or []
        return [self.get(f"/instances/{i}/simplified-tags") for i in ids]

    def received(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE received so far, in order, duplicates too."""
        try:
            return self.received_file.read_text().split()
        except FileNotFoundError:
            return []

    def hold(self) -> None:
        self.hold_file.touch()

    def release(self) -> None:
        self.hold_file.unlink(missing_ok=True)

    def stop(self) -> None:
        self.release()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)


class Prometheus:
    """A real Prometheus (Debian's package) on 127.0.0.1, scraping given /metrics ports."""

    def __init__(self, root: Path, targets: dict[str, int], interval: str = "1s") -> None:
        import shutil

        import yaml

        exe = shutil.which("prometheus")
        assert exe, "prometheus not found: 'make setup' installs Debian's prometheus"
        self.exe = exe
        self.root = root
        self.targets = dict(targets)  # service name → /metrics port
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        from shared.stack.render import scrape_config

        config = scrape_config(
            {name: f"127.0.0.1:{port}" for name, port in targets.items()},
            interval,
            str(REPO / "deploy" / "prometheus" / "rules.yml"),
        )
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = open(self.root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                self.exe,
                f"--config.file={self.root / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (
                f"prometheus exited; see {self.root}"
            )
            return http_ok(self.port, "/-/ready")

        wait_until_sync(ready, 30, "Prometheus ready")
        return self

    def query(self, promql: str) -> list[dict[str, Any]]:
        import json
        import urllib.parse
        import urllib.request

        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.parse.quote(promql)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)

"""The CLI as an operator uses it: a real process, the real broker."""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from shared import topology
from shared.schemas import DeadLetter, Probe
from shared.stack.broker import _pid_alive
from tests.helpers import REPO, Env, Reader, StageProcess, wait_until_sync

pytestmark = pytest.mark.integration

CLI = str(REPO / ".venv" / "bin" / "radstream")


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


async def test_deadletters_json_lists_reason_and_source(env: Env, tmp_path: Path) -> None:
    stage = StageProcess(
        env.service_env("preprocess"), "shared.runtime.passthrough", tmp_path / "s.log"
    ).start()
    try:
        await env.produce(
            "series", [(b"k", Probe(id=str(i), seq=i, poison=i == 1)) for i in range(3)]
        )
        async with Reader(env, "deadletter", DeadLetter) as dlq:
            await dlq.wait_for(1)
    finally:
        assert stage.terminate() == 0
    op_env = env.service_env("operator")
    res = run_cli(["deadletters", "--json"], op_env)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(rows) == 1
    assert rows[0]["reason"] == "poison"
    assert rows[0]["stage"] == "preprocess"
    assert rows[0]["source_topic"] == env.topic("series")
    assert rows[0]["source_offset"] == 1
    assert {"failed_at", "source_partition", "message", "attempts"} <= rows[0].keys()
    # the human table too
    table = run_cli(["deadletters"], op_env)
    assert table.returncode == 0 and "poison" in table.stdout
    # follow mode with a timeout ends by itself
    followed = run_cli(["deadletters", "--json", "--follow", "--timeout", "3"], op_env)
    assert followed.returncode == 0 and len(followed.stdout.splitlines()) == 1


def test_stack_up_returns_ready_is_idempotent_names_a_failed_service_and_goes_down(
    tmp_path: Path,
) -> None:
    """``stack up`` returns only when every service is ready: a modality can store to the
    gateway at once (the bug: storescu right after up got "Connection refused"). A service
    that cannot start makes ``up`` fail naming it, with the end of its log."""
    home = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env.update(RADSTREAM_HOME=str(home), RADSTREAM_STACK_PORTS="auto")  # beside any other stack
    try:
        first = run_cli(["stack", "up"], env, timeout=400)
        assert first.returncode == 0, first.stderr
        assert "broker started" in first.stdout and "every service ready" in first.stdout
        # no waiting here: up has returned, so everything must answer now
        status = run_cli(["stack", "status", "--json"], env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert {s["name"] for s in info["services"]} == {s.name for s in topology.SERVICES}
        assert all(s["ready"] and s["healthy"] for s in info["services"]), info["services"]
        host, port = info["gateway"]["dicom"].split(":")
        ct = str(get_testdata_file("CT_small.dcm", download=False))
        store = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "RADSTREAM", host, port, ct],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert store.returncode == 0, store.stdout + store.stderr
        assert info["broker"]["running"] is True
        assert set(info["lag"]) == set(topology.STAGE_NAMES)
        # the worklist answers HTTPS with a certificate of the stack's CA, sign-in first
        ports = json.loads((home / "run" / "ports.json").read_text())
        assert f"worklist: https://127.0.0.1:{ports['worklist_https']}" in first.stdout
        ca = ssl.create_default_context(cafile=str(home / "secrets" / "tls" / "ca.pem"))
        url = f"https://127.0.0.1:{ports['worklist_https']}/"
        with urllib.request.urlopen(url, context=ca, timeout=10) as page:
            assert page.url.endswith("/login") and b'name="password"' in page.read()

        pid = (home / "kafka" / "broker.pid").read_text()
        second = run_cli(["stack", "up"], env)
        assert second.returncode == 0 and "broker already running" in second.stdout
        assert "alert already running" in second.stdout
        assert (home / "kafka" / "broker.pid").read_text() == pid
        for secret in (
            "credentials.json",
            "keyring.json",
            "admin.properties",
            "tls/broker.key",
            "tls/worklist.key",
            "worklist-users.json",
            "worklist-passwords.json",
        ):
            assert stat.S_IMODE((home / "secrets" / secret).stat().st_mode) == 0o600, secret

        # the alert service dies and cannot start again (its rules file is gone): up names
        # it, with the end of its log
        alert_pid = int((home / "run" / "alert.pid").read_text())
        os.kill(alert_pid, signal.SIGKILL)
        wait_until_sync(lambda: not _pid_alive(alert_pid), 30, "alert gone")
        broken = {**env, "RADSTREAM_ALERT__RULES_FILE": str(tmp_path / "no-such-rules.yaml")}
        third = run_cli(["stack", "up", "--timeout", "120"], broken, timeout=300)
        assert third.returncode == 1, third.stdout
        assert "alert did not come up: its process exited" in third.stderr, third.stderr
        assert "no-such-rules.yaml" in third.stderr, third.stderr  # the tail of its log
        assert "gateway" not in third.stderr  # the others were ready
    finally:
        down = run_cli(["stack", "down"], env)
    assert down.returncode == 0 and "broker stopped" in down.stdout
    assert run_cli(["stack", "status"], env).returncode == 1

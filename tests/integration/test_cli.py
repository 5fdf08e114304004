"""The CLI as an operator uses it: a real process, the real broker."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from shared.schemas import DeadLetter, Probe
from shared.stack.broker import free_port
from tests.helpers import REPO, Env, Reader, StageProcess

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


def test_stack_up_is_idempotent_status_and_down(tmp_path: Path) -> None:
    home = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env.update(
        RADSTREAM_HOME=str(home),
        RADSTREAM_STACK_KAFKA_PORT=str(free_port()),
        RADSTREAM_STACK_CONTROLLER_PORT=str(free_port()),
    )
    try:
        first = run_cli(["stack", "up"], env, timeout=300)
        assert first.returncode == 0, first.stderr
        assert "broker started" in first.stdout
        pid = (home / "kafka" / "broker.pid").read_text()
        second = run_cli(["stack", "up"], env)
        assert second.returncode == 0 and "broker already running" in second.stdout
        assert (home / "kafka" / "broker.pid").read_text() == pid
        for secret in ("credentials.json", "keyring.json", "admin.properties", "tls/broker.key"):
            assert stat.S_IMODE((home / "secrets" / secret).stat().st_mode) == 0o600, secret
        status = run_cli(["stack", "status", "--json"], env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["broker"]["running"] is True
        assert set(info["lag"]) == {"ingest", "preprocess", "segmentation", "alert"}
        assert all(stage["total"] == 0 for stage in info["lag"].values())
    finally:
        down = run_cli(["stack", "down"], env)
    assert down.returncode == 0 and "broker stopped" in down.stdout
    assert run_cli(["stack", "status"], env).returncode == 1

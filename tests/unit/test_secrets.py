"""Passwords never reach a command line or a service's environment."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from shared.stack.broker import LocalBroker


def test_no_password_or_salted_password_on_the_storage_tool_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kafka-storage format --add-scram`` as the local stack runs it: what ``ps`` shows is a
    0600 argument file's name; the credentials (salted) are in that file only while it runs."""
    broker = LocalBroker(home=tmp_path, port=1, controller_port=2)
    broker.secrets_dir.mkdir(parents=True, mode=0o700)
    creds = broker.credentials()
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        argfile = Path(cmd[-1].removeprefix("@"))
        seen["cmd"], seen["mode"] = cmd, argfile.stat().st_mode & 0o777
        seen["args"] = argfile.read_text()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(LocalBroker, "classpath", "cp")
    broker.format_storage()
    cmdline = " ".join(seen["cmd"])
    assert seen["cmd"][-1].startswith("@") and seen["mode"] == 0o600
    assert "kafka.tools.StorageTool" in seen["args"] and "SCRAM-SHA-512" not in cmdline
    for name, password in creds.items():
        assert password not in cmdline and password not in seen["args"], name
        assert f"name={name}," in seen["args"] and "saltedpassword=" in seen["args"]
    assert not list(broker.secrets_dir.glob(".args-*"))  # removed after the run


def test_a_service_gets_a_password_file_not_a_password(tmp_path: Path) -> None:
    broker = LocalBroker(home=tmp_path, port=1, controller_port=2)
    broker.secrets_dir.mkdir(parents=True, mode=0o700)
    password = broker.credentials()["ingest"]
    env = broker.env_for("ingest")
    assert "RADSTREAM_KAFKA__PASSWORD" not in env
    assert not any(password in v for v in env.values())
    path = Path(env["RADSTREAM_KAFKA__PASSWORD_FILE"])
    assert path.read_text() == password and path.stat().st_mode & 0o777 == 0o600

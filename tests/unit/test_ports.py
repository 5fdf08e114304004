"""Ports for test services and the local stack: claimed machine-wide, so that parallel test
workers never hand out the same one (a stage then died on "address already in use" while
another process answered its readiness probe); a process that exits fails its readiness wait
at once, with its log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.stack import broker, local
from tests.helpers import StageProcess, wait_until_sync


@pytest.fixture
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "claims"
    monkeypatch.setattr(broker, "PORT_CLAIMS", d)
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(30)
    return p.pid


def test_a_port_claimed_by_a_live_process_is_not_handed_out(claims: Path) -> None:
    claims.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (claims / "40001").write_text(str(other.pid))
        assert broker._claim(40001) is False
        assert (claims / "40001").read_text() == str(other.pid)
    finally:
        other.kill()
        other.wait(10)


def test_a_dead_process_claim_is_taken_over_and_free_port_claims_what_it_gives(
    claims: Path,
) -> None:
    claims.mkdir()
    (claims / "40002").write_text(str(_dead_pid()))
    assert broker._claim(40002) is True
    assert (claims / "40002").read_text() == str(os.getpid())
    port = broker.free_port()
    assert (claims / str(port)).read_text() == str(os.getpid())


def test_a_service_that_exits_fails_its_readiness_wait_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "RADSTREAM_METRICS_PORT": str(broker.free_port())}
    proc = StageProcess(env, "this", tmp_path / "this.log").start()  # prints, then exits 0
    assert proc.proc is not None
    proc.proc.wait(30)
    with pytest.raises(AssertionError, match="exited"):
        proc.ready()


def test_readiness_counts_only_for_the_process_that_answers() -> None:
    # another process holding the port answers /readyz 200 with its own pid: not ours
    port = broker.free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import http.server, json, os\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        body = json.dumps({'ready': True, 'pid': os.getpid()}).encode()\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n",
        ]
    )
    try:
        wait_until_sync(lambda: local.ready_as(port, server.pid), 30, "the server's /readyz")
        assert local.ready_as(port, server.pid + 1) is False
        assert local.ready_as(broker.free_port(), server.pid) is False  # nobody listens
    finally:
        server.kill()
        server.wait(10)

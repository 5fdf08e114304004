"""A SIGTERM that reaches a service while it is still importing exits 0 (Kubernetes and the
tests stop services at any moment; nothing is in flight before the event loop runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# every service, and the pass-through stage the exactly-once kill tests run as a process
MODULES = [
    f"services.{p.parent.name}.main" for p in sorted((REPO / "services").glob("*/main.py"))
] + ["shared.runtime.passthrough"]

# Runs the service as __main__ and sends itself SIGTERM when the service's imports reach
# NumPy, i.e. in the middle of the heavy imports, deterministically.
PROBE = """
import builtins, os, runpy, signal, sys
real = builtins.__import__
def probe(name, *args, **kwargs):
    if name == "numpy" and not getattr(probe, "sent", False):
        probe.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return real(name, *args, **kwargs)
builtins.__import__ = probe
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", MODULES)
def test_sigterm_during_start_up_exits_zero(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr

"""Session fixtures: one real Kafka broker for the whole run; every test gets its own prefix
(its own copy of every topic, group, transactional id and ACL)."""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.security.envelope import Keyring, init_keyring_file
from shared.stack.broker import LocalBroker, free_port
from tests.helpers import Env, collect_refused_sockets

# Tests that start real processes (a session Kafka broker, Orthanc, Prometheus, services, whole
# stacks) mostly wait on them, so ``make test`` (``pytest -n 3``) runs them as two streams, one
# per pytest-xdist worker, each worker with its own session broker; a test module stays in one
# stream (its tests run in order). The third worker takes the unit tests (in-process, no
# broker) and the tests that start a whole stack of their own on free ports
# (RADSTREAM_STACK_PORTS=auto). xdist's own ``--dist loadgroup`` renames node ids, which pytest
# 9 no longer reads, so the grouping is this scheduler's.
STACK_DIRS = ("tests/integration/", "tests/e2e/")
STACK_STREAMS = 2
OWN_STACK = (
    "tests/e2e/test_demo.py::",
    "tests/integration/test_cli.py::test_stack_up_",
)


def stack_scope(nodeid: str) -> str:
    """The scheduling unit of a test: its stream for a stack test, itself for a unit test."""
    if nodeid.startswith(OWN_STACK):
        return "own-stack"
    if nodeid.startswith(STACK_DIRS):
        module = nodeid.split("::", 1)[0]
        return f"stack-{zlib.crc32(module.encode()) % STACK_STREAMS}"
    return nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class StackScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return stack_scope(nodeid)

    return StackScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    skip = pytest.mark.skip(reason="no CUDA device visible to CuPy")
    if not _gpu_available():
        for item in items:
            # the marker, not ``"gpu" in item.keywords``: keywords hold every parent's name,
            # so a checkout in a folder called "gpu" skipped the whole suite
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


def _gpu_available() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    home = tmp_path_factory.mktemp("kafka-home")
    b = LocalBroker(home=home, port=free_port(), controller_port=free_port(), heap="768m")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def env(broker: LocalBroker, tmp_path: Path) -> Env:
    prefix = f"t{secrets.token_hex(4)}."
    broker.bootstrap(prefix)
    keyring_path = tmp_path / "secrets" / "keyring.json"
    init_keyring_file(keyring_path)
    return Env(broker, prefix, keyring_path, Keyring.from_file(keyring_path), tmp_path)


@pytest.fixture
def collect_refused_clients() -> Iterator[None]:
    """For tests of refused Kafka clients: aiokafka leaves the SSL socket of a connection the
    broker refused in a reference cycle, and the garbage collector's ResourceWarning for it
    would fail whichever later test it happens to run in. Collected here, at this test's end."""
    yield
    collect_refused_sockets()


@pytest.fixture
def strict_cupy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The strict CuPy stand-in (tests/fake_cupy.py) installed as ``cupy`` and
    ``cupyx.scipy.ndimage`` for this test: device arrays refuse what CuPy refuses."""
    from tests import fake_cupy

    cp = fake_cupy.make()
    fake_cupy.install(monkeypatch, cp)
    return cp

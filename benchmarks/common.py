"""Shared benchmark plumbing: a throw-away broker, argument parsing, output."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.stack.broker import LocalBroker, free_port


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures")
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    parser.add_argument("--json-out", help="also write the figures as JSON to this file")
    return parser.parse_args()


@contextmanager
def temporary_broker() -> Iterator[LocalBroker]:
    with tempfile.TemporaryDirectory(prefix="radstream-bench-") as home:
        broker = LocalBroker(Path(home), port=free_port(), controller_port=free_port(), heap="1g")
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


def emit(
    figures: dict[str, Any], as_json: bool, lines: list[str], json_out: str | None = None
) -> None:
    if as_json:
        print(json.dumps(figures))
    else:
        print("\n".join(lines))
    if json_out:
        Path(json_out).write_text(json.dumps(figures, indent=1) + "\n")


def prepare(broker: LocalBroker, prefix: str) -> tuple[Path, Any]:
    """Topics and ACLs under ``prefix`` and a keyring in the broker's home: (path, keyring)."""
    from shared.security.envelope import Keyring, init_keyring_file

    broker.bootstrap(prefix)
    path = broker.home / "secrets" / "keyring.json"
    init_keyring_file(path)
    return path, Keyring.from_file(path)


def start_service(
    broker: LocalBroker, prefix: str, keyring_path: Path, name: str, **extra: str
) -> Any:
    """A service as its own process, as its principal, logging to <home>/<name>.log."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env.update(broker.env_for(name))
    env.update(
        RADSTREAM_HOME=str(broker.home),
        RADSTREAM_TOPIC_PREFIX=prefix,
        RADSTREAM_KEYRING_FILE=str(keyring_path),
        RADSTREAM_METRICS_PORT=str(free_port()),
        RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S="600",
    )
    env.update(extra)  # the caller's settings win (e.g. RADSTREAM_METRICS_PORT)
    with open(broker.home / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"services.{name}.main"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

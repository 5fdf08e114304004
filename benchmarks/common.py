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


def emit(figures: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(figures))
    else:
        print("\n".join(lines))

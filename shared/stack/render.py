"""Deployment files written from the topology (``shared/topology.py``), so that a new stage is
one entry there: the Prometheus scrape configs of the local stack and of docker-compose.

``python -m shared.stack.render`` rewrites them; ``--check`` fails when a committed file differs
from what the topology says (``tests/unit/test_topology.py`` runs the same comparison).
Kubernetes scrapes by pod annotation and needs nothing per service.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from shared import topology

REPO = Path(__file__).resolve().parents[2]
COMPOSE_METRICS_PORT = 9100  # every service's /metrics inside docker-compose


def scrape_config(
    targets: Mapping[str, str], interval: str = "5s", rules: str = "rules.yml"
) -> dict[str, Any]:
    """A Prometheus config scraping ``targets`` (service name → host:port) as job
    ``radstream``, each target labelled with its service, evaluating ``rules``."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules],
        "scrape_configs": [
            {
                "job_name": "radstream",
                "static_configs": [
                    {"targets": [target], "labels": {"service": name}}
                    for name, target in targets.items()
                ],
            }
        ],
    }


def _yaml(header: str, config: dict[str, Any]) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + str(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


GENERATED = "Written by `python -m shared.stack.render` from shared/topology.py: do not edit."


def files() -> dict[Path, str]:
    """Every rendered file: repository path → content."""
    local = {s.name: f"127.0.0.1:{s.metrics_port}" for s in topology.SERVICES}
    compose = {s.name: f"{s.name}:{COMPOSE_METRICS_PORT}" for s in topology.SERVICES}
    return {
        Path("deploy/prometheus/prometheus.yml"): _yaml(
            "Prometheus for the local stack (`radstream stack up`): the services' /metrics.\n"
            + GENERATED,
            scrape_config(local),
        ),
        Path("deploy/prometheus/prometheus-compose.yml"): _yaml(
            "Prometheus inside docker-compose: the services by their compose names.\n" + GENERATED,
            scrape_config(compose),
        ),
    }


def stale(root: Path = REPO) -> list[Path]:
    """Rendered files whose committed content differs from the topology's."""
    out = []
    for path, text in files().items():
        try:
            if (root / path).read_text() != text:
                out.append(path)
        except FileNotFoundError:
            out.append(path)
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        old = stale()
        for path in old:
            print(f"{path} is stale: run python -m shared.stack.render", file=sys.stderr)
        return 1 if old else 0
    for path, text in files().items():
        (REPO / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Operations artefacts checked mechanically: Prometheus rules (promtool), the dashboard's
queries against the metric names the services really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.alert.core import AlertMetrics
from services.gateway.core import GatewayMetrics
from services.preprocess.core import PreprocessMetrics
from shared.imaging.backend import DeviceRunner, select_backend
from shared.metrics import StageMetrics
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b(radstream(?:_[a-z0-9]+)+|radstream:[a-z0-9_:]+)")


def exported_names() -> set[str]:
    """Every sample name the services' metric objects export (as Prometheus sees them)."""
    registry = CollectorRegistry()
    stage = StageMetrics(registry, "ingest")
    GatewayMetrics(registry)
    PreprocessMetrics(registry, select_backend("cpu"))
    DeviceRunner(select_backend("cpu"), stage="preprocess", registry=registry)  # GPU fallbacks
    AlertMetrics(registry)
    from prometheus_client import Gauge

    Gauge("radstream_series_in_assembly", "x", ["partition"], registry=registry)  # ingest's gauge
    import tempfile
    from pathlib import Path

    from shared.security.envelope import Keyring
    from shared.storage import local_store

    with tempfile.TemporaryDirectory() as tmp:
        local_store(Path(tmp), Keyring.generate(), registry, "ingest").put(b"x")
    # touch labelled metrics so that their samples exist
    stage.messages.labels("ingest", "ok").inc()
    stage.deadletters.labels("ingest", "empty").inc()
    stage.handler_seconds.labels("ingest").observe(1)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # histogram families export _bucket/_count/_sum whether or not observed
    for family in registry.collect():
        if family.type == "histogram":
            names.update({family.name + s for s in ("_bucket", "_count", "_sum")})
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: 'make setup' installs Debian's prometheus")
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    # every alerting rule has at least one firing case in the tests
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = (DEPLOY / "prometheus" / "rules_test.yml").read_text()
    assert all(f"alertname: {a}" in tested for a in alerts)


def test_every_dashboard_query_uses_exported_metrics_only() -> None:
    dash = json.loads((DEPLOY / "grafana" / "radstream-overview.json").read_text())
    exported = exported_names()
    recorded = {
        r["record"]
        for g in yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used.update(METRIC.findall(target["expr"]))
    assert used, "no queries found"
    unknown = {m for m in used if m not in exported and m not in recorded}
    assert unknown == set(), f"dashboard queries metrics nobody exports: {sorted(unknown)}"
    # and the rules themselves only use exported series or other recording rules
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    exprs = " ".join(r["expr"] for g in groups for r in g["rules"])
    in_rules = {m for m in METRIC.findall(exprs) if m not in recorded}
    assert in_rules <= exported, sorted(in_rules - exported)

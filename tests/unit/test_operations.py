"""Operations artefacts checked mechanically: Prometheus rules (promtool), and the dashboard's
and the rules' queries against what the services really export: every service is built
through its real ``build(settings, keyring, registry)`` and its ``/metrics`` read over HTTP."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shared import topology
from shared.config import GatewaySettings, Settings
from shared.runtime.stage import StageRunner
from shared.security.envelope import Keyring
from shared.stack.broker import free_port
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\b(radstream(?:_[a-z0-9]+)+|radstream:[a-z0-9_:]+)")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$")


def _names(text: str) -> set[str]:
    """Every series name a scrape of this exposition can yield (families without samples
    yet, e.g. labelled counters never incremented, count with what they will export)."""
    names: set[str] = set()
    for line in text.splitlines():
        if m := TYPE_LINE.match(line):
            name, kind = m.groups()
            names.add(name)
            if kind == "histogram":
                names.update({name + s for s in ("_bucket", "_count", "_sum")})
            if kind == "counter":
                names.update({name.removesuffix("_total"), name.removesuffix("_total") + "_total"})
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            return str(r.read().decode())

    return await asyncio.to_thread(get)  # the server answers on this loop


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """service → metric names its /metrics exports, each service built as its process does
    (``shared.runtime.service.run_stage``; the gateway's own ``serve``) and served by the
    runtime's HealthServer on a free port. Nothing here talks to Kafka."""
    return asyncio.run(_build_and_scrape(tmp_path_factory.mktemp("services")))


async def _build_and_scrape(tmp: Path) -> dict[str, set[str]]:
    keyring = Keyring.generate()
    out: dict[str, set[str]] = {}
    for svc in topology.SERVICES:
        settings = Settings(
            home=tmp / svc.name,
            device="cpu",
            blob_dir=tmp / "blobs",
            metrics_port=free_port(),
            gateway=GatewaySettings(plain_dicom=True),  # as the local stack runs it
        )
        registry = CollectorRegistry()
        built: Any = importlib.import_module(svc.module).build(settings, keyring, registry)
        http = built.http if svc.stage is None else StageRunner(
            built, settings, keyring, registry
        ).http
        await http.start()
        try:
            out[svc.name] = _names(await _scrape(http.port))
        finally:
            await http.stop()
    return out


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


def _queried() -> tuple[set[str], set[str]]:
    """(metric names the dashboard and the rules query, recording-rule names)."""
    dash = json.loads((DEPLOY / "grafana" / "radstream-overview.json").read_text())
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    exprs += [r["expr"] for g in groups for r in g["rules"]]
    used = {m for e in exprs for m in METRIC.findall(e)}
    return used, recorded


def test_every_service_is_built_and_serves_metrics(exported: dict[str, set[str]]) -> None:
    assert set(exported) == {s.name for s in topology.SERVICES}
    for stage in topology.STAGE_NAMES:
        assert "radstream_messages_total" in exported[stage], stage
    # the alert service builds its metrics: the SLO rules and the latency panel have data
    assert {"radstream_e2e_latency_seconds_bucket", "radstream_alerts_total"} <= exported["alert"]
    assert "radstream_gateway_instances_total" in exported["gateway"]
    assert "radstream_series_in_assembly" in exported["ingest"]
    assert "radstream_backend_info" in exported["preprocess"]
    # the results service: PACS deliveries by object and outcome, build time by part
    assert {
        "radstream_pacs_deliveries_total",
        "radstream_results_build_seconds_bucket",
    } <= exported["results"]
    assert "radstream_pacs_deliveries_total" not in exported["alert"]  # moved with delivery
    # the notify service: deliveries by channel and outcome, attempt time by channel
    assert {
        "radstream_notifications_total",
        "radstream_notification_seconds_bucket",
    } <= exported["notify"]


def test_every_dashboard_and_rule_query_is_exported_by_some_service(
    exported: dict[str, set[str]],
) -> None:
    used, recorded = _queried()
    assert used and recorded, "no queries found"
    everything = set().union(*exported.values())
    unknown = sorted(m for m in used - recorded if m not in everything)
    assert unknown == [], f"queried but exported by no service: {unknown}"
    # recording rules only reference exported series or other recording rules
    assert all(m.startswith("radstream:") for m in recorded)


def test_a_metric_nobody_exports_would_be_caught(exported: dict[str, set[str]]) -> None:
    """The check above is not vacuous: a typo'd or unbuilt metric is reported."""
    everything = set().union(*exported.values())
    assert "radstream_e2e_latency_seconds_bucket" in everything
    assert "radstream_e2e_latency_secs_bucket" not in everything
    without_alert = set().union(*(v for k, v in exported.items() if k != "alert"))
    used, _ = _queried()
    assert "radstream_e2e_latency_seconds_bucket" in used - without_alert

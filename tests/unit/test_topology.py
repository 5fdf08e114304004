"""One topology (shared/topology.py): the services, the ACL matrix, the local stack, the CLI
and the Prometheus config all say what it says."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shared import schemas, topology
from shared.cli.main import REPLAY
from shared.config import Settings
from shared.security.envelope import Keyring
from shared.stack import local, principals, render
from tests.helpers import REPO


def _settings(tmp: Path) -> Settings:
    return Settings(home=tmp, device="cpu", blob_dir=tmp / "blobs")


def _emitted_topics(stage: topology.Stage) -> set[str]:
    """First arguments of ``Emit(...)`` in the stage's service package, resolved to strings."""
    out: set[str] = set()
    for path in sorted((REPO / "services" / stage.name).glob("*.py")):
        module = importlib.import_module(f"services.{stage.name}.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "Emit"
                and node.args
            ):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                out.add(str(arg.value))
            elif isinstance(arg, ast.Name):
                out.add(str(getattr(module, arg.id)))
            else:
                pytest.fail(f"{path.name}: Emit topic {ast.unparse(arg)} is not checkable")
    return out


@pytest.mark.parametrize("stage", topology.STAGES, ids=lambda s: s.name)
def test_each_stage_service_declares_what_the_topology_says(
    stage: topology.Stage, tmp_path: Path
) -> None:
    main = importlib.import_module(f"services.{stage.name}.main")
    spec: Any = main.build(_settings(tmp_path), Keyring.generate(), CollectorRegistry())
    assert (spec.name, spec.input_topic, spec.output_topic, spec.stateful) == (
        stage.name,
        stage.input,
        stage.output,
        stage.stateful,
    )
    assert _emitted_topics(stage) <= set(stage.outputs), "Emit to a topic the stage may not write"


def test_the_acl_matrix_is_the_topology() -> None:
    roles = principals.ROLES
    assert set(roles) == {s.name for s in topology.STAGES} | {p.name for p in topology.PARTIES}
    for s in topology.STAGES:
        role = roles[s.name]
        own = {s.changelog} if s.changelog else set()
        assert set(role.read) == {s.input} | own
        intake = f"{topology.AUDIT}.in.{s.name}"  # its audit goes to its own intake topic
        outputs = set(s.outputs) - {topology.AUDIT}
        assert set(role.write) == outputs | {topology.DEADLETTER, intake} | own
        assert role.groups == (s.name,) and role.transactional
    for p in topology.PARTIES:
        role = roles[p.name]
        write = tuple(
            f"{topology.AUDIT}.in.{p.name}" if t == topology.AUDIT and p.name != "auditlog" else t
            for t in p.write
        )
        reads = principals.INTAKES if p.name == "auditlog" else ()
        assert (role.read, role.write, role.groups, role.describe_all, role.transactional) == (
            (*p.read, *reads),
            write,
            p.groups,
            p.describe_all,
            p.transactional,
        )
    # the bootstrap spec creates exactly the topology's topics and the changelogs of stateful
    # stages, and every topic an ACL names is one of them
    created = {
        line.split("\t")[1]
        for line in principals.spec("radstream.", 3).splitlines()
        if line.startswith("topic\t")
    }
    changelogs = {s.changelog for s in topology.STAGES if s.changelog}
    intakes = set(principals.INTAKES)
    assert created == {f"radstream.{t}" for t in (*topology.TOPIC_NAMES, *changelogs, *intakes)}
    for role in roles.values():
        assert {f"radstream.{t}" for t in (*role.read, *role.write)} <= created, role.name
    assert principals.PRINCIPALS == (topology.ADMIN, *roles)


def test_every_topic_names_the_record_it_carries() -> None:
    for t in topology.TOPICS:
        assert hasattr(schemas, t.carries), f"{t.name}: shared.schemas has no {t.carries}"


def test_the_local_stack_runs_every_service_of_the_topology_as_its_principal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert local.SERVICES == topology.SERVICES
    names = ["gateway", *topology.STAGE_NAMES, "worklist", "auditlog"]
    assert [s.name for s in topology.SERVICES] == names
    ports = [s.metrics_port for s in topology.SERVICES]
    assert len(set(ports)) == len(ports)
    for s in topology.SERVICES:
        assert s.module == f"services.{s.name}.main"
        assert importlib.util.find_spec(s.module) is not None
    monkeypatch.delenv("RADSTREAM_STACK_PORTS", raising=False)
    stack = local.LocalStack(tmp_path)
    stack.broker.ensure_secrets()
    for s in topology.SERVICES:
        env = stack.service_env(s)
        assert env["RADSTREAM_KAFKA__USERNAME"] == s.principal == s.name
        assert env["RADSTREAM_METRICS_PORT"] == str(s.metrics_port)
    gateway_env = stack.service_env(topology.service("gateway"))
    assert gateway_env["RADSTREAM_GATEWAY__PORT"] == str(topology.PORTS.gateway_dicom)
    # a second stack beside the first: every port moved
    monkeypatch.setenv("RADSTREAM_STACK_PORTS", "auto")
    moved = local.LocalStack(tmp_path / "second")
    assert moved.ports.gateway_dicom != topology.PORTS.gateway_dicom
    assert set(moved.ports.metrics) == {s.name for s in topology.SERVICES}
    assert not set(moved.ports.metrics.values()) & set(ports)


def _targets(path: str) -> dict[str, list[str]]:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / path).read_text())
    return {
        sc["labels"]["service"]: sc["targets"]
        for job in config["scrape_configs"]
        for sc in job["static_configs"]
    }


def test_prometheus_scrapes_the_topology_s_services_on_their_ports() -> None:
    assert render.stale() == [], "run: python -m shared.stack.render"
    assert _targets("prometheus.yml") == {
        s.name: [f"127.0.0.1:{s.metrics_port}"] for s in topology.SERVICES
    }
    assert _targets("prometheus-compose.yml") == {
        s.name: [f"{s.name}:9100"] for s in topology.SERVICES
    }


def test_the_results_stage_is_one_entry_and_everything_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = topology.stage("results")
    assert (results.input, results.output, results.delivers) == ("findings", "results", ("pacs",))
    assert topology.topic("results").carries == "ResultsReady"
    assert topology.service("results").module == "services.results.main"
    role = principals.ROLES["results"]
    assert set(role.read) == {"findings"} and "results" in role.write and role.transactional
    # alert consumers join alerts to results; they still cannot read findings or images
    assert set(principals.ROLES["alert-consumer"].read) == {"alerts", "results"}
    # the local stack points the stage that delivers to the PACS at its Orthanc, and only it
    monkeypatch.setattr(local.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("RADSTREAM_STACK_PORTS", raising=False)
    stack = local.LocalStack(tmp_path)
    stack.broker.ensure_secrets()
    for s in topology.SERVICES:
        env = stack.service_env(s)
        pacs = {k for k in env if k.endswith("__PACS_HOST")}
        assert pacs == ({"RADSTREAM_RESULTS__PACS_HOST"} if s.name == "results" else set())


def test_cli_replays_exactly_the_replayable_stages_as_the_operator_may() -> None:
    assert {s.name: s.input for s in topology.STAGES if s.replay} == REPLAY
    operator = topology.party("operator")
    assert set(operator.write) == {*REPLAY.values(), topology.AUDIT}
    # never the raw instances, never the findings (rules are re-run from segmentation)
    assert "findings" not in operator.write and "alert" not in REPLAY
    assert set(operator.read) == set(topology.TOPIC_NAMES) - {"instances", topology.AUDIT}


def test_settings_defaults_are_the_topology_s_ports() -> None:
    s = Settings()
    assert s.kafka.bootstrap_servers == f"127.0.0.1:{topology.PORTS.kafka}"
    assert s.gateway.port == topology.PORTS.gateway_dicom
    assert s.results.pacs_port == topology.PORTS.orthanc_dicom


def test_lookups_name_what_exists() -> None:
    with pytest.raises(KeyError, match="stages: ingest"):
        topology.stage("nope")
    assert topology.stage("ingest").changelog == "ingest.state"
    assert topology.stage("alert").outputs == ("alerts", topology.AUDIT)

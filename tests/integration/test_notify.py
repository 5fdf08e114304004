"""The notify stage against the real broker, as its own principal (its ACLs only), with real
local peers: a webhook receiver that fails twice then succeeds, a FHIR server that validates
every Bundle with fhir.resources, hl7apy's MLLP server ACKing the ORU^R01, and an endpoint
that always fails."""

from __future__ import annotations

import asyncio
import http.client
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.errors import TopicAuthorizationFailedError
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from prometheus_client import CollectorRegistry

from services.notify.main import build
from shared.config import NotifySettings
from shared.runtime.stage import StageRunner
from shared.schemas import Alert, AuditEvent, DeadLetter
from shared.schemas.reasons import Reason
from shared.security.webhook import IDEMPOTENCY_HEADER, sign
from tests.helpers import (
    Env,
    Reader,
    StageProcess,
    group_caught_up,
    metrics_text,
    running,
    wait_until,
)
from tests.integration.test_acls import consume, denied, produce
from tests.notify_peers import FhirServer, MllpPeer, WebhookReceiver, write_secret

pytestmark = pytest.mark.integration

SECRET = b"integration-webhook-key-0123456789"
N = 4


def alerts(env: Env, route: str, n: int = N) -> list[tuple[bytes, Alert]]:
    out = []
    for i in range(n):
        series = f"1.2.826.0.1.3680043.10.77.{i}"
        out.append(
            (
                env.keyring.keyed_hash(series),
                Alert(
                    alert_id=f"00000000-0000-5000-8000-{route[:4].encode().hex()}{i:04d}",
                    severity="critical",
                    finding="haemorrhage",
                    finding_label=f"bleed-{i}",
                    rule="acute-haemorrhage",
                    routes=[route, "worklist"],
                    study_instance_uid=f"1.2.826.0.1.3680043.11.77.{i}",
                    series_instance_uid=series,
                    revision=1,
                    modality="CT",
                    measurements={"volume_ml": 2.0 + i, "confidence": 0.9},
                    confidence=0.9,
                    algorithm="head_ct",
                    algorithm_version="1",
                    source_partition=0,
                    source_offset=i,
                    latency_seconds=1.0,
                    created_at=datetime(2026, 11, 26, 22, 0, tzinfo=UTC),
                ),
            )
        )
    return out


def stage(env: Env, tmp: Path, targets: list[dict[str, Any]]) -> tuple[Any, CollectorRegistry]:
    write_secret(tmp / "hook.key", SECRET)
    path = tmp / "targets.yaml"
    path.write_text(yaml.safe_dump({"targets": targets}))
    settings = env.settings(
        "notify",
        retry_attempts=4,
        retry_backoff_s=0.05,
        notify=NotifySettings(targets_file=path, timeout_s=5.0),
    )
    registry = CollectorRegistry()
    spec = build(settings, env.keyring, registry)
    return StageRunner(spec, settings, env.keyring, registry), registry


def count(registry: CollectorRegistry, channel: str, outcome: str) -> float:
    labels = {"channel": channel, "outcome": outcome}
    return registry.get_sample_value("radstream_notifications_total", labels) or 0.0


async def test_each_alert_reaches_each_target_once_across_retries_restart_and_replay(
    env: Env, tmp_path: Path
) -> None:
    batch = alerts(env, "pager")
    ids = {a.alert_id for _, a in batch}
    with WebhookReceiver(SECRET, fail_first=2) as hook, FhirServer() as ehr, MllpPeer() as ie:
        targets = [
            {
                "name": "oncall",
                "channel": "webhook",
                "routes": ["pager"],
                "url": hook.url,
                "secret_file": str(tmp_path / "hook.key"),
            },
            {"name": "ehr", "channel": "fhir", "routes": ["worklist"], "base_url": ehr.url},
            {
                "name": "ris",
                "channel": "hl7",
                "routes": ["pager"],
                "host": "127.0.0.1",
                "port": ie.port,
            },
        ]
        await env.produce("alerts", batch)

        async def caught_up() -> bool:
            return await group_caught_up(env, "notify", "alerts")

        runner, registry = stage(env, tmp_path, targets)
        async with running(runner):
            await wait_until(caught_up, 90, "notify to commit every alert")
        # each webhook delivery took 3 attempts (503, 503, 200): one delivery per alert id
        assert dict(hook.delivered) == dict.fromkeys(ids, 1)
        assert dict(hook.attempts) == dict.fromkeys(ids, 3)
        assert hook.bad_signatures == 0
        assert {b["alert"]["alert_id"] for b in hook.bodies.values()} == ids
        # FHIR: one valid transaction per alert, a report and an Observation per measurement
        assert len(ehr.bundles) == N and ehr.invalid == 0
        for bundle in ehr.bundles:
            resources = [e.resource for e in bundle.entry or []]
            (report,) = [r for r in resources if isinstance(r, DiagnosticReport)]
            assert len([r for r in resources if isinstance(r, Observation)]) == 2
            assert report.imagingStudy[0].identifier.value.startswith("urn:oid:1.2.826.0.1")
        # HL7: one ORU^R01 per alert, each ACKed AA (else it would have been retried)
        assert len(ie.received) == N
        assert {m.msh.msh_9.value for m in ie.received} == {"ORU^R01^ORU_R01"}
        assert count(registry, "webhook", "delivered") == N
        assert count(registry, "webhook", "failed") == 2 * N
        assert count(registry, "hl7", "delivered") == count(registry, "fhir", "delivered") == N

        # a restarted stage (state restored from the changelog) consumes the same alerts
        # again: nothing is delivered twice
        await env.produce("alerts", batch)
        runner, registry = stage(env, tmp_path, targets)
        async with running(runner):
            await wait_until(caught_up, 90, "notify to commit the replayed alerts")
        assert dict(hook.delivered) == dict.fromkeys(ids, 1)
        assert dict(hook.attempts) == dict.fromkeys(ids, 3)
        assert len(ehr.bundles) == N and len(ie.received) == N
        assert count(registry, "webhook", "duplicate") == N
        assert count(registry, "webhook", "delivered") == 0

        # a forged request (another key) is detected by the receiver and not taken
        body = b'{"event":"radstream.alert","alert":{"alert_id":"forged"}}'
        conn = http.client.HTTPConnection("127.0.0.1", hook.server.server_address[1], timeout=5)
        conn.request(
            "POST", "/", body, {IDEMPOTENCY_HEADER: "forged", **sign(b"not the key", body)}
        )
        assert conn.getresponse().status == 401
        conn.close()
        assert hook.bad_signatures == 1 and "forged" not in hook.delivered

    async with Reader(env, "audit.in.notify", AuditEvent) as audit:
        await audit.drain(1.0)
    delivered = [e for e in audit.records if e.action == "notification_delivered"]
    assert len(delivered) == 3 * N
    assert all("1.2.826" not in e.model_dump_json() for e in delivered)
    async with Reader(env, "deadletter", DeadLetter) as dead:
        await dead.drain(0.5)
    assert dead.records == []


async def test_an_always_failing_endpoint_produces_a_dead_letter_with_its_reason(
    env: Env, tmp_path: Path
) -> None:
    """The service as its own process (``python -m services.notify.main``, as deployed)."""
    batch = alerts(env, "broken", 2)
    write_secret(tmp_path / "hook.key", SECRET)
    with WebhookReceiver(SECRET, always_fail=True) as down:
        targets = tmp_path / "targets.yaml"
        target = {
            "name": "down",
            "channel": "webhook",
            "routes": ["broken"],
            "url": down.url,
            "secret_file": str(tmp_path / "hook.key"),
        }
        targets.write_text(yaml.safe_dump({"targets": [target]}))
        proc = StageProcess(
            env.service_env(
                "notify",
                RADSTREAM_NOTIFY__TARGETS_FILE=str(targets),
                RADSTREAM_RETRY_ATTEMPTS="4",
                RADSTREAM_RETRY_BACKOFF_S="0.05",
            ),
            "services.notify.main",
            tmp_path / "notify.log",
        ).start()
        try:
            await env.produce("alerts", batch)
            async with Reader(env, "deadletter", DeadLetter) as dead:
                letters = await dead.wait_for(2, 120)
            # the counters move right after the commit that made the dead letters visible
            dead_counted = (
                'radstream_deadletters_total{reason="notification_failed",stage="notify"} 2.0'
            )

            async def counted() -> bool:
                return dead_counted in await asyncio.to_thread(metrics_text, proc.port)

            await wait_until(counted, 30, "the dead letters counted in /metrics")
            metrics = await asyncio.to_thread(metrics_text, proc.port)
        finally:
            assert proc.terminate() == 0
    assert {d.reason for d in letters} == {Reason.NOTIFICATION_FAILED}
    for d in letters:
        assert d.stage == "notify" and d.attempts == 4
        assert d.source_topic == env.topic("alerts")
        assert "webhook:down: HTTP 503" in d.message and "1.2.826" not in d.message
    assert dict(down.attempts) == dict.fromkeys((a.alert_id for _, a in batch), 4)
    assert not down.delivered
    assert 'radstream_notifications_total{channel="webhook",outcome="failed"} 8.0' in metrics
    assert 'radstream_deadletters_total{reason="notification_failed",stage="notify"} 2.0' in metrics
    # no alert content in the service's log: no UID, no alert id, no key material
    log = (tmp_path / "notify.log").read_text()
    assert "dead letter notification_failed" in log
    assert "1.2.826" not in log and batch[0][1].alert_id not in log
    assert SECRET.decode() not in log


async def test_notify_reads_alerts_and_nothing_upstream(env: Env) -> None:
    """Its own principal: the alert feed, never images or findings; it cannot forge alerts."""
    await produce(env, "admin", "alerts")
    assert await consume(env, "notify", "alerts", group="notify") == 1
    for topic in ("instances", "volumes", "findings", "results"):
        await denied(consume(env, "notify", topic), TopicAuthorizationFailedError)
    await denied(produce(env, "notify", "alerts"), TopicAuthorizationFailedError)

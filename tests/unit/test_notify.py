"""Notifications (services/notify): webhook signatures, FHIR resources, the ORU^R01 and its
ACK, routing per rule route, and the stage in memory (StageHarness) against real local HTTP
and MLLP peers: retries, delivery state, dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.notify import fhir, hl7, main, webhook
from services.notify.targets import Hl7Target, Targets, WebhookTarget
from services.notify.transport import DeliveryFailed
from shared.config import NotifySettings, Settings
from shared.runtime.harness import FakeClock, StageHarness
from shared.schemas import Alert, AuditEvent
from shared.schemas.reasons import Reason
from shared.security.envelope import Keyring
from shared.security.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from tests.notify_peers import FhirServer, MllpPeer, WebhookReceiver, tls_server, write_secret

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
SECRET = b"0123456789abcdef0123456789abcdef"


def alert(n: int = 1, severity: str = "critical", routes: tuple[str, ...] = ("pager",)) -> Alert:
    return Alert(
        alert_id=f"00000000-0000-5000-8000-{n:012d}",
        severity=severity,  # type: ignore[arg-type]
        finding="haemorrhage",
        finding_label=f"bleed-{n}",
        rule="acute-haemorrhage",
        routes=list(routes),
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        revision=1,
        modality="CT",
        measurements={"volume_ml": 2.5, "confidence": 0.91, "diameter_mm": 14.0},
        subtype="intraparenchymal",
        confidence=0.91,
        algorithm="head_ct",
        algorithm_version="1.2",
        source_partition=0,
        source_offset=n,
        latency_seconds=1.5,
        created_at=datetime(2026, 11, 26, 22, 0, tzinfo=UTC),
    )


# ---- webhook signatures --------------------------------------------------------------------
def test_a_receiver_detects_a_bad_signature() -> None:
    body = webhook.body(alert())
    h = sign(SECRET, body, now=1_800_000_000)
    ts, sig = h[TIMESTAMP_HEADER], h[SIGNATURE_HEADER]
    assert sig.startswith("v1=") and len(sig) == 3 + 64
    assert verify(SECRET, ts, sig, body, now=1_800_000_010)
    assert not verify(SECRET, ts, sig, body.replace(b"critical", b"low"), now=1_800_000_010)
    assert not verify(b"another key", ts, sig, body, now=1_800_000_010)
    assert not verify(SECRET, str(int(ts) + 1), sig, body, now=1_800_000_010)  # ts is signed
    assert not verify(SECRET, ts, sig, body, now=1_800_000_000 + 301)  # a replay, too late
    assert not verify(SECRET, None, sig, body) and not verify(SECRET, ts, "v1=zz", body)
    assert not verify(SECRET, "12ab", sig, body)
    # key rotation: the old and the new signature side by side, either one verifies
    assert verify(SECRET, ts, f"v1={'0' * 64}, {sig}", body, now=1_800_000_010)


def test_the_webhook_body_is_the_alert_and_the_same_every_attempt() -> None:
    a = alert()
    assert webhook.body(a) == webhook.body(alert())
    doc = json.loads(webhook.body(a))
    assert (
        doc["event"] == "radstream.alert"
        and Alert.model_validate_json(json.dumps(doc["alert"])) == a
    )


# ---- FHIR ----------------------------------------------------------------------------------
def test_fhir_resources_validate_and_reference_the_imaging_study() -> None:
    a = alert()
    built = fhir.bundle(a)
    wire = built.model_dump_json(exclude_none=True)
    back = Bundle.model_validate_json(wire)  # the library validates every resource again
    assert back.type == "transaction"
    resources = [e.resource for e in back.entry or []]
    observations = [r for r in resources if isinstance(r, Observation)]
    (report,) = [r for r in resources if isinstance(r, DiagnosticReport)]
    assert len(observations) == len(a.measurements) == 3
    by_code = {o.code.coding[0].code: o.valueQuantity for o in observations}
    assert by_code["118565006"].value == 2.5 and by_code["118565006"].code == "mL"
    assert by_code["81827009"].value == 14.0 and by_code["81827009"].system == fhir.UCUM
    assert report.status == "preliminary" and report.code.coding[0].code == "18748-4"
    (study,) = report.imagingStudy
    assert study.type == "ImagingStudy"
    assert study.identifier.system == "urn:dicom:uid"
    assert study.identifier.value == f"urn:oid:{STUDY}"
    obs_urls = [e.fullUrl for e in back.entry or [] if isinstance(e.resource, Observation)]
    assert [r.reference for r in report.result] == obs_urls
    assert report.identifier[0].value == a.alert_id
    requests = [e.request for e in back.entry or []]
    assert all(r.method == "POST" and a.alert_id in r.ifNoneExist for r in requests)
    assert wire == fhir.bundle(alert()).model_dump_json(exclude_none=True)  # deterministic


def test_the_fhir_library_refuses_an_invalid_resource() -> None:
    """What "validated by the library" catches: required elements, unknown elements, types
    (fhir.resources does not check code bindings such as the status value set)."""
    with pytest.raises(ValidationError, match="code"):
        Observation(status="preliminary")  # code is required
    with pytest.raises(ValidationError, match="Extra inputs"):
        Observation(status="preliminary", code={"text": "x"}, severity="high")
    with pytest.raises(ValidationError, match="valueQuantity"):
        Observation(status="preliminary", code={"text": "x"}, valueQuantity={"value": "big"})
    with pytest.raises(ValidationError, match="code"):
        DiagnosticReport.model_validate({"resourceType": "DiagnosticReport", "status": "final"})


# ---- HL7 v2 --------------------------------------------------------------------------------
def test_the_oru_validates_strictly_and_carries_the_alert() -> None:
    a = alert()
    target = Hl7Target(name="ris", channel="hl7", host="127.0.0.1", port=1, routes=["pager"])
    raw = hl7.er7(hl7.oru(a, target)).decode()
    msg = parse_message(raw, validation_level=VALIDATION_LEVEL.STRICT)
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01" and msg.msh.msh_12.value == "2.5"
    assert msg.msh.msh_10.value == hl7.control_id(a, target) == hl7.control_id(alert(), target)
    segments = raw.split("\r")
    obx = [s for s in segments if s.startswith("OBX|")]
    assert len(obx) == 4 + len(a.measurements)
    assert f"|{STUDY}|" in raw and "|AA|" in obx[0]
    assert any("volume_ml" in s and "|2.5|mL^^UCUM|" in s for s in obx)
    assert not any(s.startswith("PID|") for s in segments)  # the alert has no patient identity


@pytest.mark.parametrize(
    ("code", "retriable"), [("AE", True), ("CE", True), ("AR", False), ("CR", False)]
)
def test_ack_codes(code: str, retriable: bool) -> None:
    ack = "MSH|^~\\&|IE|H|RADSTREAM|RADSTREAM|20261126||ACK|1|P|2.5\rMSA|{}|CTRL1\r"
    hl7.check_ack(ack.format("AA").encode(), "CTRL1", "ie")
    hl7.check_ack(ack.format("CA").encode(), "CTRL1", "ie")
    with pytest.raises(DeliveryFailed) as err:
        hl7.check_ack(ack.format(code).encode(), "CTRL1", "ie")
    assert err.value.retriable is retriable and code in err.value.message
    with pytest.raises(DeliveryFailed, match="another message") as other:
        hl7.check_ack(ack.format("AA").encode(), "CTRL2", "ie")
    assert other.value.retriable
    with pytest.raises(DeliveryFailed, match="unreadable ACK"):
        hl7.check_ack(b"not hl7 at all", "CTRL1", "ie")


# ---- routing and secrets -------------------------------------------------------------------
def _secret(tmp: Path, name: str, value: bytes = SECRET) -> Path:
    return write_secret(tmp / name, value)


def test_targets_serve_the_routes_and_severities_they_name(tmp_path: Path) -> None:
    doc = {
        "targets": [
            {
                "name": "oncall",
                "channel": "webhook",
                "routes": ["pager"],
                "min_severity": "high",
                "url": "https://pager.invalid/h",
                "secret_file": str(_secret(tmp_path, "k")),
            },
            {
                "name": "ehr",
                "channel": "fhir",
                "routes": ["worklist"],
                "base_url": "https://fhir.invalid/r4",
            },
            {"name": "ris", "channel": "hl7", "host": "ie.invalid", "port": 2575, "tls": True},
        ]
    }
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(doc))
    targets = Targets.load(path)
    names = lambda a: [t.name for t in targets.for_alert(a)]  # noqa: E731
    assert names(alert(routes=("pager", "worklist"))) == ["oncall", "ehr"]
    assert names(alert(severity="medium", routes=("pager",))) == []
    assert names(alert(severity="low", routes=("worklist", "hl7:ris"))) == ["ehr", "ris"]
    # the secret is read from its file and never shown
    hook = targets.targets[0]
    assert hook.secret.get_secret_value().encode() == SECRET  # type: ignore[union-attr]
    assert SECRET.decode() not in repr(targets) + str(targets.model_dump())
    with pytest.raises(ValidationError, match="no key file at") as err:
        Targets.model_validate(
            {"targets": [{**doc["targets"][0], "secret_file": str(tmp_path / "missing")}]}
        )
    assert SECRET.decode() not in str(err.value)
    with pytest.raises(ValidationError, match="unique"):
        Targets.model_validate({"targets": [doc["targets"][1], doc["targets"][1]]})


def test_secret_files_others_may_read_are_refused(tmp_path: Path) -> None:
    shared = _secret(tmp_path, "shared.key")
    shared.chmod(0o644)
    target = {"name": "x", "channel": "webhook", "url": "https://h.invalid/", "secret_file": ""}
    with pytest.raises(ValidationError, match="others may access it") as err:
        Targets.model_validate({"targets": [{**target, "secret_file": str(shared)}]})
    assert SECRET.decode() not in str(err.value)


def test_a_rotating_key_signs_twice_so_either_key_verifies(tmp_path: Path) -> None:
    new, old = b"the-new-key-0123456789", b"the-old-key-0123456789"
    hook = Targets.model_validate(
        {
            "targets": [
                {
                    "name": "x",
                    "channel": "webhook",
                    "url": "https://h.invalid/",
                    "secret_file": str(_secret(tmp_path, "new", new)),
                    "previous_secret_file": str(_secret(tmp_path, "old", old)),
                }
            ]
        }
    ).targets[0]
    assert isinstance(hook, WebhookTarget)
    body = webhook.body(alert())
    h = webhook.headers(hook, alert(), body, now=1_800_000_000)
    ts, sig = h[TIMESTAMP_HEADER], h[SIGNATURE_HEADER]
    assert sig.count("v1=") == 2
    for key in (new, old):  # a receiver not yet given the new key, and one already moved
        assert verify(key, ts, sig, body, now=1_800_000_001)
    assert not verify(b"a third key", ts, sig, body, now=1_800_000_001)


def test_the_default_targets_file_loads() -> None:
    assert Targets.load(NotifySettings().targets_file).targets == []


# ---- the stage in memory against real local peers -----------------------------------------
def _stage(
    tmp: Path, targets: list[dict[str, Any]], **notify: Any
) -> tuple[StageHarness[Alert], Any]:
    path = tmp / "targets.yaml"
    path.write_text(yaml.safe_dump({"targets": targets}))
    settings = Settings(
        home=tmp,
        device="cpu",
        retry_attempts=notify.pop("retry_attempts", 4),
        retry_backoff_s=0.01,
        notify=NotifySettings(targets_file=path, timeout_s=5.0, **notify),
    )
    keyring, registry, clock = Keyring.generate(), CollectorRegistry(), FakeClock()
    spec = main.build(settings, keyring, registry, clock=clock.time)
    return StageHarness(spec, settings, keyring, registry=registry, clock=clock), registry


def _count(registry: CollectorRegistry, channel: str, outcome: str) -> float:
    name = "radstream_notifications_total"
    return registry.get_sample_value(name, {"channel": channel, "outcome": outcome}) or 0.0


def test_flaky_webhook_gets_one_delivery_and_a_replay_sends_nothing(tmp_path: Path) -> None:
    with WebhookReceiver(SECRET, fail_first=2) as hook, FhirServer() as ehr, MllpPeer() as ie:
        harness, registry = _stage(
            tmp_path,
            [
                {
                    "name": "oncall",
                    "channel": "webhook",
                    "routes": ["pager"],
                    "url": hook.url,
                    "secret_file": str(_secret(tmp_path, "k")),
                },
                {
                    "name": "ehr",
                    "channel": "fhir",
                    "routes": ["pager"],
                    "base_url": ehr.url,
                    "token_file": str(_secret(tmp_path, "t", b"tok-123")),
                },
                {
                    "name": "ris",
                    "channel": "hl7",
                    "routes": ["pager"],
                    "host": "127.0.0.1",
                    "port": ie.port,
                },
            ],
        )
        a = alert()
        result = harness.send(a, key=SERIES)
        assert result.dead_letters == []
        # the webhook failed twice (503) then took it: one delivery; the other targets took
        # it at the first attempt and were not sent to again on the retries
        assert hook.attempts[a.alert_id] == 3 and dict(hook.delivered) == {a.alert_id: 1}
        assert len(ehr.bundles) == 1 and ehr.authorization == ["Bearer tok-123"]
        assert len(ie.received) == 1
        assert harness.clock.waits == [0.01, 0.02]
        audits = [r for r in result.outputs.get("audit", []) if isinstance(r, AuditEvent)]
        assert sorted(e.resource.split("/")[0] for e in audits) == [
            "fhir:ehr",
            "hl7:ris",
            "webhook:oncall",
        ]
        assert all(STUDY not in e.model_dump_json() for e in audits)
        assert len(result.state_changes) == 1  # the delivered targets, one key per alert
        # the same alert consumed again: delivered before, nothing is sent
        again = harness.send(a, key=SERIES)
        assert again.dead_letters == [] and again.outputs == {}
        assert hook.attempts[a.alert_id] == 3 and len(ehr.bundles) == 1 and len(ie.received) == 1
        assert _count(registry, "webhook", "delivered") == 1
        assert _count(registry, "webhook", "failed") == 2
        assert _count(registry, "webhook", "duplicate") == 1
        assert (
            _count(registry, "hl7", "delivered") == 1 and _count(registry, "fhir", "delivered") == 1
        )
        assert hook.bad_signatures == 0


def test_an_always_failing_endpoint_is_dead_lettered_with_its_reason(tmp_path: Path) -> None:
    with WebhookReceiver(SECRET, always_fail=True) as down, MllpPeer("AR") as refusing:
        harness, registry = _stage(
            tmp_path,
            [
                {
                    "name": "down",
                    "channel": "webhook",
                    "routes": ["pager"],
                    "url": down.url,
                    "secret_file": str(_secret(tmp_path, "k")),
                },
                {
                    "name": "picky",
                    "channel": "hl7",
                    "routes": ["worklist"],
                    "host": "127.0.0.1",
                    "port": refusing.port,
                },
            ],
        )
        failed = harness.send(alert(1, routes=("pager",)), key=SERIES)
        (letter,) = failed.dead_letters
        assert letter.reason == Reason.NOTIFICATION_FAILED and letter.attempts == 4
        assert "webhook:down: HTTP 503" in letter.message and STUDY not in letter.message
        assert down.attempts[alert(1).alert_id] == 4 and not down.delivered
        rejected = harness.send(alert(2, routes=("worklist",)), key=SERIES)
        (letter,) = rejected.dead_letters
        assert letter.reason == Reason.NOTIFICATION_REJECTED and letter.attempts == 1
        assert "hl7:picky: HL7 AR" in letter.message
        assert len(refusing.received) == 1
        assert _count(registry, "webhook", "failed") == 4
        assert _count(registry, "hl7", "rejected") == 1
        sample = registry.get_sample_value(
            "radstream_deadletters_total", {"stage": "notify", "reason": "notification_failed"}
        )
        assert sample == 1


def test_tls_endpoints_are_verified_and_plaintext_stays_on_loopback(tmp_path: Path) -> None:
    ca, server_tls = tls_server(tmp_path)
    with WebhookReceiver(SECRET, tls=server_tls) as hook, MllpPeer(tls=server_tls) as ie:
        key = str(_secret(tmp_path, "k"))
        harness, registry = _stage(
            tmp_path,
            [
                {
                    "name": "hook",
                    "channel": "webhook",
                    "routes": ["pager"],
                    "url": hook.url,
                    "secret_file": key,
                    "ca_file": str(ca),
                },
                {
                    "name": "ie",
                    "channel": "hl7",
                    "routes": ["pager"],
                    "host": "127.0.0.1",
                    "port": ie.port,
                    "tls": True,
                    "ca_file": str(ca),
                },
                # the same receiver, but its CA not trusted: the handshake fails every attempt
                {
                    "name": "untrusted",
                    "channel": "webhook",
                    "routes": ["worklist"],
                    "url": hook.url,
                    "secret_file": key,
                },
            ],
        )
        assert hook.url.startswith("https://")
        ok = harness.send(alert(1, routes=("pager",)), key=SERIES)
        assert ok.dead_letters == []
        assert dict(hook.delivered) == {alert(1).alert_id: 1} and len(ie.received) == 1
        bad = harness.send(alert(2, routes=("worklist",)), key=SERIES)
        (letter,) = bad.dead_letters
        assert letter.reason == Reason.NOTIFICATION_FAILED and "SSL" in letter.message
        assert alert(2).alert_id not in hook.attempts  # nothing reached the receiver
        assert _count(registry, "webhook", "failed") == 4
    # plain http / MLLP without TLS beyond loopback is refused unless a site allows it
    with pytest.raises(ValidationError, match="allow_plaintext"):
        Targets.model_validate(
            {
                "targets": [
                    {
                        "name": "x",
                        "channel": "webhook",
                        "url": "http://ris.example.org/h",
                        "secret_file": key,
                    }
                ]
            }
        )
    with pytest.raises(ValidationError, match="allow_plaintext"):
        Targets.model_validate(
            {"targets": [{"name": "x", "channel": "hl7", "host": "10.1.2.3", "port": 2575}]}
        )
    allowed = Targets.model_validate(
        {
            "targets": [
                {
                    "name": "x",
                    "channel": "hl7",
                    "host": "10.1.2.3",
                    "port": 2575,
                    "allow_plaintext": True,
                }
            ]
        }
    )
    assert allowed.targets[0].channel == "hl7"


def test_a_target_that_keeps_failing_is_skipped_for_a_cool_down(tmp_path: Path) -> None:
    """After two alerts gave up on it, the broken webhook is not contacted for 30 s: its
    alerts are dead-lettered at once (no retry schedule holding up the partition) and the
    healthy target still gets every alert; after the cool-down it is tried again."""
    with WebhookReceiver(SECRET, always_fail=True) as down, MllpPeer() as ie:
        harness, registry = _stage(
            tmp_path,
            [
                {
                    "name": "down",
                    "channel": "webhook",
                    "routes": ["pager"],
                    "url": down.url,
                    "secret_file": str(_secret(tmp_path, "k")),
                },
                {
                    "name": "ie",
                    "channel": "hl7",
                    "routes": ["pager"],
                    "host": "127.0.0.1",
                    "port": ie.port,
                },
            ],
            retry_attempts=3,
            breaker_failures=2,
            breaker_cooldown_s=30.0,
        )
        for n in (1, 2):
            (letter,) = harness.send(alert(n), key=SERIES).dead_letters
            assert letter.attempts == 3 and down.attempts[alert(n).alert_id] == 3
        waits = len(harness.clock.waits)
        (letter,) = harness.send(alert(3), key=SERIES).dead_letters
        assert letter.reason == Reason.NOTIFICATION_FAILED and letter.attempts == 1
        assert "webhook:down: circuit open" in letter.message
        assert alert(3).alert_id not in down.attempts and len(harness.clock.waits) == waits
        assert len(ie.received) == 3  # the healthy target got every alert, once
        assert _count(registry, "webhook", "circuit_open") == 1
        harness.clock.advance(31.0)
        (letter,) = harness.send(alert(4), key=SERIES).dead_letters
        assert letter.attempts == 3 and down.attempts[alert(4).alert_id] == 3  # tried again
        (letter,) = harness.send(alert(5), key=SERIES).dead_letters
        assert letter.attempts == 1  # and open again at once after one more give-up
        assert len(ie.received) == 5

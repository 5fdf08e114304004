"""Notification cost per alert, without the broker: building each channel's message (webhook
JSON + HMAC, FHIR Bundle validated by fhir.resources, ORU^R01 validated by hl7apy), and one
alert delivered to all three channels' real local peers (HTTP, HTTP, MLLP on 127.0.0.1)
through the notify stage's handler in the in-memory harness (decode, route, deliver, state,
audit, encode). Prints ms per alert per part and the share of the handler spent building.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml
from prometheus_client import CollectorRegistry

from benchmarks.common import emit, parse_args
from services.notify import fhir, hl7, main, webhook
from services.notify.targets import Hl7Target, WebhookTarget
from shared.config import NotifySettings, Settings
from shared.runtime.harness import StageHarness
from shared.schemas import Alert
from shared.security.envelope import Keyring
from tests.notify_peers import FhirServer, MllpPeer, WebhookReceiver, write_secret

SECRET = b"benchmark-webhook-key-0123456789"


def alert(i: int) -> Alert:
    return Alert(
        alert_id=f"00000000-0000-5000-8000-{i:012d}",
        severity="critical",
        finding="haemorrhage",
        finding_label=f"bleed-{i}",
        rule="acute-haemorrhage",
        routes=["pager"],
        study_instance_uid=f"1.2.826.0.1.3680043.8.498.{i}",
        series_instance_uid=f"1.2.826.0.1.3680043.8.499.{i}",
        revision=1,
        modality="CT",
        measurements={"volume_ml": 2.5, "confidence": 0.91, "diameter_mm": 14.0},
        algorithm="head_ct",
        algorithm_version="1",
        source_partition=0,
        source_offset=i,
        latency_seconds=1.0,
        created_at=datetime.now(UTC),
    )


def per_alert_ms(fn: object, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(alert(i))  # type: ignore[operator]
    return (time.perf_counter() - t0) / n * 1000


def main_() -> None:
    args = parse_args(__doc__ or "")
    n = 50 if args.quick else 300
    with tempfile.TemporaryDirectory(prefix="radstream-bench-") as home:
        tmp = Path(home)
        key = write_secret(tmp / "hook.key", SECRET)
        hook_target = WebhookTarget(
            name="h", channel="webhook", url="http://127.0.0.1:1/", secret_file=key
        )
        hl7_target = Hl7Target(name="i", channel="hl7", host="127.0.0.1", port=1)
        build = {
            "webhook": per_alert_ms(
                lambda a: webhook.headers(hook_target, a, webhook.body(a), time.time()), n
            ),
            "fhir": per_alert_ms(lambda a: fhir.bundle(a).model_dump_json(exclude_none=True), n),
            "hl7": per_alert_ms(lambda a: hl7.er7(hl7.oru(a, hl7_target)), n),
        }
        with WebhookReceiver(SECRET) as hook, FhirServer() as ehr, MllpPeer() as ie:
            targets = [
                {
                    "name": "hook",
                    "channel": "webhook",
                    "routes": ["pager"],
                    "url": hook.url,
                    "secret_file": str(key),
                },
                {"name": "ehr", "channel": "fhir", "routes": ["pager"], "base_url": ehr.url},
                {
                    "name": "ie",
                    "channel": "hl7",
                    "routes": ["pager"],
                    "host": "127.0.0.1",
                    "port": ie.port,
                },
            ]
            path = tmp / "targets.yaml"
            path.write_text(yaml.safe_dump({"targets": targets}))
            settings = Settings(home=tmp, device="cpu", notify=NotifySettings(targets_file=path))
            keyring, registry = Keyring.generate(), CollectorRegistry()
            harness = StageHarness(main.build(settings, keyring, registry), settings, keyring)
            harness.send(alert(10**6), key="warm-up")
            t0 = time.perf_counter()
            for i in range(n):
                result = harness.send(alert(i), key=f"series-{i}")
                assert not result.dead_letters
            handle = (time.perf_counter() - t0) / n * 1000
            assert len(hook.delivered) == n + 1 and len(ehr.bundles) == n + 1
            assert len(ie.received) == n + 1
    built = sum(build.values())
    figures = {
        "alerts": n,
        "build_ms": {k: round(v, 3) for k, v in build.items()},
        "three_channels_ms_per_alert": round(handle, 3),
        "build_share": round(built / handle, 3),
    }
    lines = [
        f"notify, {n} alerts, one CPU thread, peers on 127.0.0.1",
        *(f"  build {k:8s} {v:7.2f} ms/alert" for k, v in build.items()),
        f"  deliver to all three (handler, harness) {handle:7.2f} ms/alert"
        f" ({1000 / handle:.0f} alerts/s); building is {built / handle:.0%} of it",
    ]
    emit(figures, args.json, lines, args.json_out)


if __name__ == "__main__":
    main_()

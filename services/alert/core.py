"""Alert's core: SegmentationDone → one Alert per matching finding (per series revision).

Rules and alerts only: the DICOM SEG, SR, pictures and their delivery to the PACS are the
results stage's (``services/results``), which consumes the same findings independently, so an
alert never waits for them. Consumers join an alert to its results record by series, revision
and finding label."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.alert.rules import MEASURES, RuleSet
from shared.runtime.raised import RaisedAlerts
from shared.runtime.stage import Context, Emit, HandlerResult
from shared.schemas import Alert, AuditEvent, SegmentationDone

NAMESPACE = uuid.UUID("6d1c6a0e-5d0b-4c4a-9a77-7f1f4bb2a1e1")


def alert_id(series_uid: str, revision: int, finding_label: str, rule: str) -> str:
    """Deterministic: the same finding of the same revision always has the same id."""
    return str(uuid.uuid5(NAMESPACE, f"{series_uid}|{revision}|{finding_label}|{rule}"))


def _acquisition(value: str | None) -> datetime | None:
    if not value:
        return None
    for fmt in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S", "%Y%m%d"):
        try:
            return datetime.strptime(value[: len(datetime.now().strftime(fmt))], fmt).replace(
                tzinfo=UTC
            )
        except ValueError:
            continue
    return None


ALERT_KINDS = frozenset({"nodule", "mass", "haemorrhage", "midline_shift"})  # bounded labels
E2E_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.e2e = Histogram(
            "radstream_e2e_latency_seconds",
            "Last instance of a series published → alert created",
            ["severity"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.alerts = Counter(
            "radstream_alerts", "Alerts raised", ["severity", "finding"], registry=registry
        )
        self.duplicates = Counter(
            "radstream_alert_duplicates",
            "Alerts not published again: their id was raised before (replay, re-analysis)",
            registry=registry,
        )


@dataclass
class AlertCore:
    rules: RuleSet
    metrics: AlertMetrics | None = None
    raised: RaisedAlerts | None = None  # ids published before (keyed state): never twice

    def handle(self, msg: SegmentationDone, ctx: Context) -> HandlerResult:
        out: list[Emit] = []
        now = datetime.now(UTC)
        acquired = _acquisition(msg.acquired_at)
        series_key = ctx.key_for(msg.series_instance_uid)
        suppressed = 0
        for finding in msg.findings:
            rule = self.rules.first_match(finding, msg.modality, msg.body_part)
            if rule is None:
                continue
            aid = alert_id(msg.series_instance_uid, msg.revision, finding.label, rule.name)
            if self.raised is not None and ctx.state is not None:
                if not self.raised.admit(ctx.state, series_key, [aid], now.timestamp()):
                    suppressed += 1
                    continue
            measurements = {
                k: float(getattr(finding, k)) for k in MEASURES if getattr(finding, k) is not None
            }
            latency = max(0.0, (now - msg.last_published_at).total_seconds())
            if self.metrics is not None:
                # observed when handled; a transaction that aborts and is redone observes twice
                kind = finding.type if finding.type in ALERT_KINDS else "other"
                self.metrics.e2e.labels(rule.severity).observe(latency)
                self.metrics.alerts.labels(rule.severity, kind).inc()
            out.append(
                Emit(
                    "alerts",
                    Alert(
                        alert_id=aid,
                        severity=rule.severity,
                        finding=finding.type,
                        finding_label=finding.label,
                        rule=rule.name,
                        routes=list(rule.routes),
                        study_instance_uid=msg.study_instance_uid,
                        series_instance_uid=msg.series_instance_uid,
                        revision=msg.revision,
                        modality=msg.modality,
                        body_part=msg.body_part,
                        measurements=measurements,
                        subtype=finding.subtype,
                        confidence=finding.confidence,
                        confidence_source=finding.confidence_source,
                        features=dict(finding.features),
                        centroid_mm=finding.centroid_mm,
                        seg_sop_instance_uid=msg.seg_sop_instance_uid,
                        algorithm=msg.algorithm,
                        algorithm_version=msg.algorithm_version,
                        parameters=msg.parameters,
                        source_partition=ctx.partition,
                        source_offset=ctx.offset,
                        latency_seconds=latency,
                        acquisition_latency_seconds=(now - acquired).total_seconds()
                        if acquired
                        else None,
                        created_at=now,
                    ),
                )
            )
        if suppressed:
            if self.metrics is not None:
                self.metrics.duplicates.inc(suppressed)
            audit = AuditEvent(
                actor="alert",
                action="alert_duplicate",
                resource=series_key.decode(),
                outcome="success",
            )
            out.append(Emit("audit", audit))
        return out

    def tick(self, ctx: Context, now: float) -> HandlerResult:
        """Forget the raised ids of series quiet for the retention."""
        if self.raised is not None and ctx.state is not None:
            self.raised.expire(ctx.state, now)
        return None

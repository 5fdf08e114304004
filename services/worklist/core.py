"""The worklist's pure core: alerts joined to their results and acknowledgements, and what
each role may see of them. No Kafka, no HTTP.

Identity: an alert carries the study and series UIDs inside its encrypted envelope and no
patient name; the patient's identity travels with the results, in the DICOM SEG (it copies
the source images' patient module). A clinician's view shows it (:func:`identity_from_seg`,
opened only when a clinician's page is rendered); an operator's view shows only a
pseudonym: the alert's Kafka key (the pipeline's keyed hash of the series UID), never a
name, an ID or a UID.
"""

from __future__ import annotations

import io
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

import pydicom

from shared.schemas import Alert, AlertAck, ResultsReady
from shared.security.accounts import Role

SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
_UNITS = {"_ml": "mL", "_mm2": "mm²", "_mm": "mm", "_hu": "HU", "_s": "s"}


@dataclass(frozen=True)
class Identity:
    """Who the patient is (PHI): for clinicians' eyes only, never logged."""

    name: str
    patient_id: str
    accession: str = ""
    study_date: str = ""


def identity_from_seg(data: bytes) -> Identity:
    """The patient module of a DICOM SEG (headers only, pixel data never read)."""
    ds = pydicom.dcmread(
        io.BytesIO(data),
        stop_before_pixels=True,
        specific_tags=["PatientName", "PatientID", "AccessionNumber", "StudyDate"],
    )
    name = str(ds.get("PatientName", "") or "").replace("^", " ").strip()
    return Identity(
        name=name or "(no name)",
        patient_id=str(ds.get("PatientID", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
    )


def pseudonym(key: bytes | None) -> str:
    """The series' pseudonym an operator sees: its Kafka key (already a keyed hash)."""
    if not key:
        return "S-unknown"
    return "S-" + key[:10].decode("ascii", "replace").upper()


@dataclass
class Entry:
    alert: Alert
    key: bytes | None
    results: ResultsReady | None = None
    acks: list[AlertAck] = field(default_factory=list)


class Worklist:
    """Alerts by id (each once, however often it is read), newest ``max_alerts`` kept; results
    joined on (series, revision), whichever arrives first; acknowledgements by alert id."""

    def __init__(self, max_alerts: int = 500) -> None:
        self.max_alerts = max_alerts
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._results: OrderedDict[tuple[str, int], ResultsReady] = OrderedDict()
        self._acks: OrderedDict[str, list[AlertAck]] = OrderedDict()

    def add_alert(self, alert: Alert, key: bytes | None) -> Entry | None:
        """The new entry, or None when this alert id is already listed (a re-read)."""
        if alert.alert_id in self._entries:
            return None
        entry = Entry(
            alert,
            key,
            self._results.get((alert.series_instance_uid, alert.revision)),
            list(self._acks.pop(alert.alert_id, [])),
        )
        self._entries[alert.alert_id] = entry
        while len(self._entries) > self.max_alerts:
            self._entries.popitem(last=False)
        return entry

    def add_results(self, results: ResultsReady) -> list[Entry]:
        """The listed entries these results belong to (now joined)."""
        join = (results.series_instance_uid, results.revision)
        self._results[join] = results
        while len(self._results) > self.max_alerts:
            self._results.popitem(last=False)
        out = []
        for entry in self._entries.values():
            a = entry.alert
            if (a.series_instance_uid, a.revision) == join:
                entry.results = results
                out.append(entry)
        return out

    def add_ack(self, ack: AlertAck) -> Entry | None:
        """The entry acknowledged (None if not listed yet: kept for when it arrives)."""
        entry = self._entries.get(ack.alert_id)
        if entry is None:
            self._acks.setdefault(ack.alert_id, []).append(ack)
            while len(self._acks) > self.max_alerts:
                self._acks.popitem(last=False)
            return None
        if all(a.ack_id != ack.ack_id for a in entry.acks):
            entry.acks.append(ack)
        return entry

    def get(self, alert_id: str) -> Entry | None:
        return self._entries.get(alert_id)

    def newest(self, limit: int | None = None) -> list[Entry]:
        ordered = sorted(self._entries.values(), key=lambda e: e.alert.created_at, reverse=True)
        return ordered[:limit] if limit else ordered


def new_ack(entry: Entry, user: str, role: Role, source: str) -> AlertAck:
    return AlertAck(
        ack_id=str(uuid.uuid4()),
        alert_id=entry.alert.alert_id,
        user=user,
        role=role,
        source=source,
    )


@dataclass(frozen=True)
class AlertView:
    """One row of the worklist as a role may see it (everything as text, escaped on render)."""

    alert_id: str
    severity: str
    finding: str
    finding_type: str
    subtype: str
    confidence: str
    measurements: list[tuple[str, str]]
    latency: str
    study: str  # modality and body part
    created_at: str
    patient: str  # identity (clinician, once known) or pseudonym
    identified: bool  # ``patient`` is the patient's identity
    overlays: list[str]  # URLs of the overlay pictures
    acked: str  # "" or who acknowledged it, when


def _measure(name: str, value: float) -> tuple[str, str]:
    for suffix, unit in _UNITS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("_", " "), f"{value:.1f} {unit}"
    return name.replace("_", " "), f"{value:.2f}"


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def view(entry: Entry, role: Role, identity: Identity | None) -> AlertView:
    """What ``role`` sees of ``entry``. ``identity`` is used for clinicians only."""
    a = entry.alert
    if role == "clinician" and identity is not None:
        patient = f"{identity.name} · ID {identity.patient_id}"
        if identity.accession:
            patient += f" · Acc {identity.accession}"
        identified = True
    elif role == "clinician":
        patient = f"{pseudonym(entry.key)} (identity follows with the results)"
        identified = False
    else:
        patient, identified = pseudonym(entry.key), False
    overlays = []
    if entry.results is not None:
        overlays = [
            f"/alerts/{a.alert_id}/overlays/{i}" for i in range(len(entry.results.overlays[:3]))
        ]
    acked = ""
    if entry.acks:
        first = min(entry.acks, key=lambda k: k.at)
        acked = f"acknowledged by {first.user} ({first.role}) at {first.at.strftime('%H:%M:%S')}"
    return AlertView(
        alert_id=a.alert_id,
        severity=a.severity,
        finding=a.finding_label,
        finding_type=a.finding,
        subtype=a.subtype or "",
        confidence=""
        if a.confidence is None
        else f"{a.confidence:.0%}"
        + (f" ({a.confidence_source.replace('_', ' ')})" if a.confidence_source else ""),
        measurements=[
            _measure(k, v) for k, v in sorted(a.measurements.items()) if k != "confidence"
        ],
        latency=f"{a.latency_seconds:.1f} s",
        study=" ".join(x for x in (a.modality, a.body_part or "") if x),
        created_at=_time(a.created_at),
        patient=patient,
        identified=identified,
        overlays=overlays,
        acked=acked,
    )

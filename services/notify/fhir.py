"""FHIR channel: an alert as a DiagnosticReport with one Observation per measurement and a
reference to its ImagingStudy, in a Bundle transaction POSTed to the configured FHIR base.

The resources are built with ``fhir.resources`` (its R4B models: R4's DiagnosticReport,
Observation and Bundle are unchanged in R4B, and 8.x ships no separate R4 package), which
validates each on construction: a resource that does not validate is never sent. Creation is
conditional on the alert id (``ifNoneExist`` on the identifier), so a re-sent alert makes no
second report on a server that honours it. The alert carries no patient identity; the report
points at the study by its Study Instance UID (``urn:dicom:uid``), which the EHR or the PACS
already links to the patient.
"""

from __future__ import annotations

import uuid

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from services.notify.targets import FhirTarget
from services.notify.transport import post
from shared.schemas import Alert

NAMESPACE = uuid.UUID("3f0d8f43-3d4c-4f55-9a3a-2c1b7b6e5d21")
ALERT_SYSTEM = "urn:radstream:alert"
MEASUREMENT_SYSTEM = "urn:radstream:measurement"
SCT, LOINC, UCUM = "http://snomed.info/sct", "http://loinc.org", "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# measurement → (code system, code, display, UCUM unit)
CODES: dict[str, tuple[str, str, str, str]] = {
    "volume_ml": (SCT, "118565006", "Volume", "mL"),
    "diameter_mm": (SCT, "81827009", "Diameter", "mm"),
    "long_axis_mm": (SCT, "103339001", "Long axis", "mm"),
    "short_axis_mm": (SCT, "103340004", "Short axis", "mm"),
    "area_mm2": (SCT, "42798000", "Area", "mm2"),
    "mean_value": (MEASUREMENT_SYSTEM, "mean_value", "Mean value in the finding", "1"),
    "shift_mm": (MEASUREMENT_SYSTEM, "shift_mm", "Midline shift", "mm"),
    "confidence": (MEASUREMENT_SYSTEM, "confidence", "Algorithm confidence", "1"),
}


def _urn(alert: Alert, part: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, f'{alert.alert_id}|{part}')}"


def _study(alert: Alert) -> dict[str, object]:
    return {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{alert.study_instance_uid}"},
        "display": f"{alert.modality} study",
    }


def observation(alert: Alert, name: str, value: float) -> Observation:
    system, code, display, unit = CODES.get(
        name, (MEASUREMENT_SYSTEM, name, name.replace("_", " "), "1")
    )
    return Observation(
        identifier=[{"system": f"{ALERT_SYSTEM}-measurement", "value": f"{alert.alert_id}/{name}"}],
        status="preliminary",
        category=[{"coding": [{"system": OBS_CATEGORY, "code": "imaging"}]}],
        code={"coding": [{"system": system, "code": code, "display": display}], "text": display},
        effectiveDateTime=alert.created_at,
        valueQuantity={"value": value, "unit": unit, "system": UCUM, "code": unit},
        derivedFrom=[_study(alert)],
        method={"text": f"{alert.algorithm} {alert.algorithm_version}"},
    )


def report(alert: Alert, results: list[str]) -> DiagnosticReport:
    subtype = f" ({alert.subtype})" if alert.subtype else ""
    return DiagnosticReport(
        identifier=[{"system": ALERT_SYSTEM, "value": alert.alert_id}],
        status="preliminary",
        category=[{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        code={
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
        },
        effectiveDateTime=alert.created_at,
        issued=alert.created_at,
        imagingStudy=[_study(alert)],
        result=[{"reference": r} for r in results],
        conclusion=(
            f"RadStream {alert.severity} alert: {alert.finding}{subtype} "
            f"(rule {alert.rule}, {alert.algorithm} {alert.algorithm_version}); "
            "computer-generated, not yet reviewed by a radiologist"
        ),
    )


def bundle(alert: Alert) -> Bundle:
    """The transaction: Observations, then the DiagnosticReport that lists them."""
    entries: list[dict[str, object]] = []
    refs: list[str] = []
    for name, value in sorted(alert.measurements.items()):
        url = _urn(alert, name)
        refs.append(url)
        entries.append(
            {
                "fullUrl": url,
                "resource": observation(alert, name, value),
                "request": {
                    "method": "POST",
                    "url": "Observation",
                    "ifNoneExist": f"identifier={ALERT_SYSTEM}-measurement|{alert.alert_id}/{name}",
                },
            }
        )
    entries.append(
        {
            "fullUrl": _urn(alert, "report"),
            "resource": report(alert, refs),
            "request": {
                "method": "POST",
                "url": "DiagnosticReport",
                "ifNoneExist": f"identifier={ALERT_SYSTEM}|{alert.alert_id}",
            },
        }
    )
    return Bundle(type="transaction", entry=entries)


def deliver(target: FhirTarget, alert: Alert, *, timeout_s: float) -> None:
    payload = bundle(alert).model_dump_json(exclude_none=True).encode()
    headers = {
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
        "User-Agent": "radstream-notify/1",
    }
    if target.token is not None:
        headers["Authorization"] = f"Bearer {target.token.get_secret_value()}"
    post(target.base_url, payload, headers, timeout_s=timeout_s, ca_file=target.ca_file)

"""HL7 v2 channel: an alert as an ORU^R01 (v2.5) sent over MLLP, answered by an ACK.

Built and validated (strictly, against the v2.5 message structure) with ``hl7apy``. One OBR
for the alert (filler order number: the alert id; result status P, preliminary), OBX for the
finding (abnormal flag AA for a critical alert, A otherwise), the Study and Series Instance
UIDs, and one NM OBX per measurement. The alert carries no patient identity, so there is no PID:
the interface engine matches the study by its UID. MSH-10 (the control id) is derived from the
alert id and the target, so a re-sent alert has the same control id and an engine can drop it.

ACK handling (MSA-1): AA/CA accepted; AE/CE (application error) retried, then dead-lettered;
AR/CR (rejected) dead-lettered at once; an ACK for another control id is retried.
"""

from __future__ import annotations

import hashlib
import re

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from services.notify.targets import Hl7Target
from services.notify.transport import DeliveryFailed, mllp_exchange, tls_context
from shared.schemas import Alert

VERSION = "2.5"
UCUM = {"volume_ml": "mL", "area_mm2": "mm2", "mean_value": "1", "confidence": "1"}
_UNSAFE = re.compile(r"[|^~\\&\r\n]")


def _text(value: str) -> str:
    """A value with the HL7 delimiters removed (our values are codes and UIDs)."""
    return _UNSAFE.sub(" ", value)


def control_id(alert: Alert, target: Hl7Target) -> str:
    """MSH-10: 20 characters, the same for every attempt at this alert and target."""
    return hashlib.sha256(f"{alert.alert_id}|{target.name}".encode()).hexdigest()[:20]


def oru(alert: Alert, target: Hl7Target) -> Message:
    """The ORU^R01 of ``alert``; raises an hl7apy error if it does not validate."""
    m = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    when = alert.created_at.strftime("%Y%m%d%H%M%S")
    m.msh.msh_3 = target.sending_application
    m.msh.msh_4 = target.sending_facility
    if target.receiving_application:
        m.msh.msh_5 = target.receiving_application
    if target.receiving_facility:
        m.msh.msh_6 = target.receiving_facility
    m.msh.msh_7 = when
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id(alert, target)
    m.msh.msh_11 = "P"
    m.msh.msh_12 = VERSION
    order = m.add_group("ORU_R01_PATIENT_RESULT").add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = f"{alert.alert_id}^RADSTREAM"
    order.obr.obr_4 = "18748-4^Diagnostic imaging study^LN"
    order.obr.obr_7 = when
    order.obr.obr_25 = "P"
    rows: list[tuple[str, str, str, str, str]] = [
        (
            "CWE",
            "59776-5^Procedure findings^LN",
            f"{_text(alert.finding)}^{_text(alert.finding)}^RADSTREAM",
            "",
            "AA" if alert.severity == "critical" else "A",
        ),
        ("ST", "110180^Study Instance UID^DCM", alert.study_instance_uid, "", ""),
        ("ST", "112002^Series Instance UID^DCM", alert.series_instance_uid, "", ""),
        ("ST", "severity^Alert severity^RADSTREAM", alert.severity, "", ""),
    ]
    for name, number in sorted(alert.measurements.items()):
        unit = UCUM.get(name, "mm")
        rows.append(
            ("NM", f"{name}^{name.replace('_', ' ')}^RADSTREAM", f"{number:g}", f"{unit}^^UCUM", "")
        )
    for i, (vtype, ident, value, unit, flag) in enumerate(rows, 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(i)
        obx.obx_2 = vtype
        obx.obx_3 = ident
        obx.obx_5 = value
        if unit:
            obx.obx_6 = unit
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = "P"
        obx.obx_14 = when
    m.validate()
    return m


def er7(message: Message) -> bytes:
    return str(message.to_er7()).encode("utf-8")


def check_ack(raw: bytes, expected_control_id: str, host: str) -> None:
    """Raise :class:`DeliveryFailed` unless ``raw`` is an accepting ACK of our message."""
    try:
        ack = parse_message(raw.decode("utf-8", "replace").strip("\r\n") + "\r")
        code = str(ack.msa.msa_1.value)
        acked = str(ack.msa.msa_2.value)
    except (HL7apyException, AttributeError, ValueError, IndexError) as exc:
        raise DeliveryFailed(True, f"unreadable ACK from {host} ({type(exc).__name__})") from None
    if acked != expected_control_id:
        raise DeliveryFailed(True, f"ACK from {host} acknowledges another message")
    if code in ("AA", "CA"):
        return
    if code in ("AE", "CE"):
        raise DeliveryFailed(True, f"HL7 {code} (application error) from {host}")
    if code in ("AR", "CR"):
        raise DeliveryFailed(False, f"HL7 {code} (rejected) from {host}")
    raise DeliveryFailed(True, f"unknown ACK code from {host}")


def deliver(target: Hl7Target, alert: Alert, *, timeout_s: float) -> None:
    message = oru(alert, target)
    answer = mllp_exchange(
        target.host,
        target.port,
        er7(message),
        timeout_s=timeout_s,
        tls=tls_context(target.ca_file) if target.tls else None,
    )
    check_ack(answer, control_id(alert, target), target.host)

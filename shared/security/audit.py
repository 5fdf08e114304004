"""The audit trail's hash chain, its verification and its RFC 5424 (syslog) form. Pure.

Every principal writes its audit events (:class:`shared.schemas.AuditEvent`) to its own intake
topic ``audit.in.<principal>``, which the broker lets that principal alone write (ACLs,
shared/stack/principals.py); the sequencer (services/auditlog) reads every intake topic and
appends each event to the single-partition ``audit`` topic as an :class:`AuditEntry` whose
``principal`` is the intake's owner (broker-verified, whatever the event's ``actor`` says) and
whose ``hash`` chains it to the entry before.

:func:`verify` recomputes the chain: an edited field, a dropped, inserted or reordered entry
breaks it at that entry. A rewrite of the whole tail from the edit onwards is caught by
comparing the head with a copy kept elsewhere (the syslog export to a collector, IHE ATNA
style: :func:`to_syslog` lines carry every entry's hash).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.schemas import AuditEntry, AuditEvent

GENESIS = "0" * 64
INTAKE = "audit.in."  # logical prefix of the intake topics: audit.in.<principal>
_SD_ID = "radstream@32473"  # structured data id (32473: the example enterprise number)
_FACILITY = 10  # authpriv: security/authorization messages
_SEVERITY = {"success": 6, "denied": 4, "error": 3}  # informational, warning, error


def intake_topic(principal: str) -> str:
    """The logical intake topic ``principal`` writes its audit events to."""
    return INTAKE + principal


def principal_of(topic: str) -> str:
    """The owner of an intake topic (full name under any prefix); ValueError if not one."""
    marker = "." + INTAKE
    full = "." + topic
    if marker not in full:
        raise ValueError(f"{topic!r} is not an audit intake topic")
    principal = full.rsplit(marker, 1)[1]
    if not principal or "." in principal:
        raise ValueError(f"{topic!r} is not an audit intake topic")
    return principal


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


def entry_hash(entry: AuditEntry | dict[str, Any]) -> str:
    """SHA-256 over every field but ``hash`` itself (``prev`` included), canonical JSON."""
    fields = entry.model_dump(mode="json") if isinstance(entry, AuditEntry) else dict(entry)
    fields.pop("hash", None)
    return hashlib.sha256(_canonical(fields)).hexdigest()


@dataclass
class Chain:
    """The sequencer's head: the next entry's ``seq`` and ``prev``."""

    seq: int = 0
    prev: str = GENESIS

    @classmethod
    def after(cls, last: AuditEntry | None) -> Chain:
        return cls() if last is None else cls(last.seq + 1, last.hash)

    def append(
        self, event: AuditEvent, principal: str, source: str, now: datetime | None = None
    ) -> AuditEntry:
        fields: dict[str, Any] = {
            "schema_version": AuditEntry.VERSION,
            "seq": self.seq,
            "principal": principal,
            "actor": event.actor,
            "action": event.action,
            "resource": event.resource,
            "outcome": event.outcome,
            "at": event.at,
            "recorded_at": now or datetime.now(UTC),
            "source": source,
            "prev": self.prev,
        }
        draft = AuditEntry.model_validate(fields | {"hash": GENESIS})
        entry = draft.model_copy(update={"hash": entry_hash(draft)})
        self.seq, self.prev = entry.seq + 1, entry.hash
        return entry

    def append_unreadable(self, principal: str, source: str, reason: str) -> AuditEntry:
        """An intake record that could not be read still takes its place in the chain."""
        event = AuditEvent(
            actor=principal,
            action=f"unreadable:{reason}"[:64],
            resource=source[:256],
            outcome="error",
        )
        return self.append(event, principal, source)


@dataclass
class Verification:
    entries: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(entries: Iterable[AuditEntry], *, start: AuditEntry | None = None) -> Verification:
    """Walk the chain: each entry's hash recomputed, linked to the one before, ``seq`` without
    gaps. ``start``: the entry just before the first (verifying a tail); else the chain must
    begin at seq 0 with the genesis ``prev``."""
    out = Verification()
    expected = Chain.after(start)
    for entry in entries:
        out.entries += 1
        if entry.seq != expected.seq:
            out.problems.append(f"seq {entry.seq}: expected seq {expected.seq} (entry missing?)")
        if entry.prev != expected.prev:
            out.problems.append(f"seq {entry.seq}: not linked to the entry before it")
        if entry_hash(entry) != entry.hash:
            out.problems.append(f"seq {entry.seq}: content does not match its hash (edited)")
        expected = Chain(entry.seq + 1, entry.hash)
        out.head = entry.hash
    return out


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _token(value: str, limit: int) -> str:
    """A syslog header field: printable US-ASCII without spaces, or the nil value."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def to_syslog(entry: AuditEntry, hostname: str = "-", app: str = "radstream") -> str:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOST APP - MSGID [SD] MSG``; facility authpriv,
    severity by outcome; every field of the entry (hashes included) in structured data."""
    pri = _FACILITY * 8 + _SEVERITY[entry.outcome]
    ts = entry.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    params = {
        "seq": str(entry.seq),
        "principal": entry.principal,
        "actor": entry.actor,
        "action": entry.action,
        "resource": entry.resource,
        "outcome": entry.outcome,
        "recorded": entry.recorded_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "source": entry.source,
        "prev": entry.prev,
        "hash": entry.hash,
    }
    sd = "[" + _SD_ID + "".join(f' {k}="{_sd_escape(v)}"' for k, v in params.items()) + "]"
    msgid = _token(entry.action.split(":", 1)[0], 32)
    msg = f"{entry.principal} {entry.action} {entry.resource} {entry.outcome}"
    return f"<{pri}>1 {ts} {_token(hostname, 255)} {_token(app, 48)} - {msgid} {sd} {msg}"

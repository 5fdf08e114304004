"""The audit trail's hash chain: intact chains verify, any edit, drop or reorder is found, and
the syslog export is RFC 5424."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import pytest

from shared.schemas import AuditEntry, AuditEvent
from shared.security.audit import (
    GENESIS,
    Chain,
    entry_hash,
    intake_topic,
    principal_of,
    to_syslog,
    verify,
)

# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
SYSLOG = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>\S{1,255}) "
    r"(?P<app>\S{1,48}) (?P<proc>\S{1,128}) (?P<msgid>\S{1,32}) "
    r'(?P<sd>\[radstream@32473(?: [a-z]+="(?:[^"\\\]]|\\["\\\]])*")+\])(?: (?P<msg>.*))?$'
)


def _chain(n: int) -> list[AuditEntry]:
    chain = Chain()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return [
        chain.append(
            AuditEvent(
                actor="operator",
                action=f"read:{i}",
                resource="a" * 32,
                outcome="success",
                at=at,
            ),
            "operator",
            f"radstream.audit.in.operator/0/{i}",
        )
        for i in range(n)
    ]


def test_an_intact_chain_verifies_and_links_every_entry() -> None:
    entries = _chain(5)
    assert entries[0].prev == GENESIS and [e.seq for e in entries] == [0, 1, 2, 3, 4]
    assert all(b.prev == a.hash for a, b in itertools.pairwise(entries))
    result = verify(entries)
    assert result.ok and result.entries == 5 and result.head == entries[-1].hash
    # a tail verifies from the entry before it
    assert verify(entries[2:], start=entries[1]).ok


@pytest.mark.parametrize(
    "field,value",
    [
        ("resource", "b" * 32),
        ("principal", "alert-consumer"),
        ("outcome", "denied"),
        ("at", datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)
def test_one_edited_event_breaks_the_chain_at_that_event(field: str, value: object) -> None:
    entries = _chain(5)
    entries[2] = entries[2].model_copy(update={field: value})
    result = verify(entries)
    assert not result.ok
    assert result.problems == ["seq 2: content does not match its hash (edited)"]


def test_an_edit_with_its_hash_recomputed_still_breaks_the_next_link() -> None:
    entries = _chain(5)
    forged = entries[2].model_copy(update={"resource": "b" * 32})
    entries[2] = forged.model_copy(update={"hash": entry_hash(forged)})
    result = verify(entries)
    assert result.problems == ["seq 3: not linked to the entry before it"]


def test_dropped_and_reordered_entries_are_found() -> None:
    entries = _chain(5)
    dropped = verify(entries[:2] + entries[3:])
    assert any("seq 3: expected seq 2" in p for p in dropped.problems)
    swapped = verify([entries[0], entries[2], entries[1], *entries[3:]])
    assert not swapped.ok
    assert not verify(entries[1:]).ok  # the first entries cut off


def test_the_sequencer_names_the_broker_verified_principal_not_the_claimed_actor() -> None:
    event = AuditEvent(actor="operator", action="read:alerts", resource="t", outcome="success")
    entry = Chain().append(event, principal_of("radstream.audit.in.alert-consumer"), "src")
    assert entry.principal == "alert-consumer" and entry.actor == "operator"
    assert intake_topic("results") == "audit.in.results"
    assert principal_of("t1a2b.audit.in.results") == "results"
    for bad in ("radstream.audit", "radstream.audit.in.", "x.audit.in.a.b", "radstream.alerts"):
        with pytest.raises(ValueError):
            principal_of(bad)


def test_unreadable_intake_records_still_take_their_place_in_the_chain() -> None:
    chain = Chain()
    entry = chain.append_unreadable("gateway", "radstream.audit.in.gateway/0/7", "integrity")
    assert entry.outcome == "error" and entry.action == "unreadable:integrity"
    assert verify([entry]).ok


def test_syslog_lines_are_rfc5424_with_every_field_and_escaped_values() -> None:
    (entry,) = _chain(1)
    entry = entry.model_copy(update={"resource": 'x"]\\y', "outcome": "denied"})
    line = to_syslog(entry, hostname="host one")
    m = SYSLOG.match(line)
    assert m is not None, line
    assert int(m["pri"]) == 10 * 8 + 4  # authpriv.warning for a denial
    assert m["host"] == "hostone" and m["app"] == "radstream" and m["msgid"] == "read"
    assert 'resource="x\\"\\]\\\\y"' in m["sd"]
    assert f'hash="{entry.hash}"' in m["sd"] and f'prev="{entry.prev}"' in m["sd"]
    assert m["ts"] == "2026-01-02T03:04:05.000000Z"
    ok = to_syslog(_chain(1)[0])
    assert ok.startswith("<86>1 ")  # authpriv.info


def test_the_sequencer_starts_over_after_a_kafka_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed transaction (broker gone, fenced) must not end the audit trail: the sequencer
    runs again (re-reading the head), counted, until stopped."""
    import asyncio

    from aiokafka.errors import KafkaConnectionError
    from prometheus_client import CollectorRegistry

    from services.auditlog.core import Sequencer
    from shared.config import Settings
    from shared.security.envelope import Keyring

    registry = CollectorRegistry()
    seq = Sequencer(Settings(), Keyring.generate(), registry)
    calls: list[int] = []

    async def run(stop: asyncio.Event) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise KafkaConnectionError("broker gone")
        stop.set()

    monkeypatch.setattr(seq, "run", run)

    async def main() -> None:
        await asyncio.wait_for(seq.run_until_stopped(asyncio.Event(), backoff_s=0.01), 10)

    asyncio.run(main())
    assert len(calls) == 3
    assert registry.get_sample_value("radstream_audit_sequencer_restarts_total") == 2

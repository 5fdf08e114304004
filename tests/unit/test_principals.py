from __future__ import annotations

from shared.stack.principals import ROLES, acl_lines, spec
from shared.topology import STAGES


def grants(principal: str, prefix: str = "radstream.") -> set[tuple[str, str, str, str]]:
    out = set()
    for line in acl_lines(prefix, ROLES[principal]):
        _, _, rtype, pattern, name, op = line.split("\t")
        out.add((rtype, pattern, name, op))
    return out


def test_scanner_can_only_write_instances() -> None:
    g = grants("scanner")
    assert {op for (_, _, _, op) in g} <= {"WRITE", "DESCRIBE"}
    assert {name for (_, _, name, op) in g if op == "WRITE"} == {"radstream.instances"}


def test_alert_consumer_reads_only_alerts_and_the_results_they_join_to() -> None:
    g = grants("alert-consumer")
    reads = {name for (rtype, _, name, op) in g if rtype == "TOPIC" and op == "READ"}
    assert reads == {"radstream.alerts", "radstream.results"}
    # it writes only the audit records of its own reads, to its own intake topic
    assert {name for (*_, name, op) in g if op == "WRITE"} == {"radstream.audit.in.alert-consumer"}


def test_each_stage_writes_only_its_outputs_and_owns_its_ids() -> None:
    for stage in STAGES:
        g = grants(stage.name)
        own = (f"{stage.name}.state",) if stage.stateful else ()
        writes = {name for (rtype, _, name, op) in g if rtype == "TOPIC" and op == "WRITE"}
        audit = f"audit.in.{stage.name}"
        outputs = tuple(t for t in stage.outputs if t != "audit")
        assert writes == {f"radstream.{t}" for t in (*outputs, "deadletter", audit, *own)}
        reads = {name for (rtype, _, name, op) in g if rtype == "TOPIC" and op == "READ"}
        assert reads == {f"radstream.{t}" for t in (stage.input, *own)}
        assert ("TRANSACTIONAL_ID", "PREFIXED", f"radstream.{stage.name}.", "WRITE") in g
        assert ("GROUP", "LITERAL", f"radstream.{stage.name}", "READ") in g
        assert ("GROUP", "PREFIXED", f"radstream.{stage.name}.", "READ") in g


def test_no_principal_s_group_grant_matches_another_principal_s_group() -> None:
    """``radstream.alert`` as a prefix matched ``radstream.alert-consumer`` (issue 14, low): the
    alert stage could join, commit in and read the offsets of the pager's group."""
    groups = {f"radstream.{group}" for role in ROLES.values() for group in role.groups}
    for name, role in ROLES.items():
        own = {f"radstream.{group}" for group in role.groups}
        for line in acl_lines("radstream.", role):
            _, _, rtype, pattern, granted, _ = line.split("\t")
            if rtype != "GROUP" or granted == "radstream.":  # describe_all: DESCRIBE only
                continue
            matched = {
                g
                for g in groups
                if (g == granted if pattern == "LITERAL" else g.startswith(granted))
            }
            assert matched <= own, f"{name} may join {matched - own}"


def test_only_stateful_stages_have_a_changelog() -> None:
    text = spec("radstream.", 3)
    assert "radstream.ingest.state" in text  # ingest keeps series state
    assert "radstream.alert.state" in text  # alert keeps the ids it raised
    assert "radstream.preprocess.state" not in text and "radstream.segmentation.state" not in text


def test_no_wildcards_in_the_matrix() -> None:
    text = spec("radstream.", 3)
    assert "\t*\t" not in text and "User:*" not in text
    assert "cleanup.policy=compact" in text  # state changelogs are compacted


def test_only_the_sequencer_writes_the_audit_trail_and_each_intake_has_one_writer() -> None:
    """The audit trail's principal is broker-verified: ``audit.in.<p>`` is writable by ``p``
    alone, ``audit`` by the sequencer alone, and only auditors and the sequencer read it."""
    writers: dict[str, set[str]] = {}
    readers: dict[str, set[str]] = {}
    for name in ROLES:
        for rtype, _, topic, op in grants(name):
            if rtype == "TOPIC" and op == "WRITE":
                writers.setdefault(topic, set()).add(name)
            if rtype == "TOPIC" and op == "READ":
                readers.setdefault(topic, set()).add(name)
    assert writers["radstream.audit"] == {"auditlog"}
    assert readers["radstream.audit"] == {"auditor", "auditlog"}  # the head, to chain on
    for topic, who in writers.items():
        if topic.startswith("radstream.audit.in."):
            assert who == {topic.removeprefix("radstream.audit.in.")}
            assert readers[topic] == {"auditlog"}

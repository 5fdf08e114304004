"""Who may do what: one Kafka principal per service and per outside party, least privilege.

The access matrix is data: :func:`acl_spec` turns it into the topic and ACL lines that
``deploy/kafka/Bootstrap.java`` applies. Every name is under the topic prefix, so a test can
bootstrap an isolated copy of the whole matrix under its own prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import topology
from shared.security.audit import intake_topic
from shared.topology import ADMIN, AUDIT, DEADLETTER

SEQUENCER = "auditlog"  # reads every intake topic, the only writer of ``audit``

__all__ = ["ADMIN", "PRINCIPALS", "ROLES", "STAGES", "Role", "acl_lines", "spec", "topics"]


@dataclass(frozen=True)
class Role:
    """What one principal may do. Topics are logical names (``series``), groups and
    transactional-id prefixes are suffixes of the topic prefix."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # consumer groups it may join: the name, or "<name>.*"
    transactional: bool = False  # may use transactional ids "<prefix><name>."
    describe_all: bool = False  # may describe every topic and group (lag, status)
    # its key file (shared/security/keyfile.py): purposes it may open (private keys) and
    # seal (public keys), whether it holds the Kafka-key HMAC keys and the blob naming key
    opens: frozenset[str] = frozenset()
    seals: frozenset[str] = frozenset()
    hmac: bool = False
    blob_names: bool = False


def _intake(name: str, write: tuple[str, ...]) -> tuple[str, ...]:
    """``write`` with ``audit`` replaced by the principal's own intake topic: only the audit
    sequencer writes the chained trail (shared/security/audit.py)."""
    if name == SEQUENCER:
        return write
    return tuple(intake_topic(name) if t == AUDIT else t for t in write)


def _purposes(topics: tuple[str, ...]) -> set[str]:
    return {topology.purpose_of(t) for t in topics}


def _stage_role(stage: topology.Stage) -> Role:
    """Read the input (and own changelog), write outputs + dead letters + audit (+ changelog),
    own the group and the transactional ids. Keys: open what it reads (input, own state,
    blobs it reads), seal what it writes."""
    own = (stage.changelog,) if stage.changelog else ()
    read = (stage.input, *own)
    write = _intake(stage.name, tuple(dict.fromkeys((*stage.outputs, DEADLETTER, AUDIT, *own))))
    return Role(
        name=stage.name,
        read=read,
        write=write,
        groups=(stage.name,),
        transactional=True,
        opens=frozenset(_purposes(read) | set(stage.blobs_read)),
        seals=frozenset(_purposes(write) | set(stage.blobs_written)),
        hmac=True,
        blob_names=bool(stage.blobs_read or stage.blobs_written),
    )


def _party_role(party: topology.Party, intakes: tuple[str, ...] = ()) -> Role:
    read = (*party.read, *intakes)
    write = _intake(party.name, party.write)
    return Role(
        name=party.name,
        read=read,
        write=write,
        groups=party.groups,
        transactional=party.transactional,
        describe_all=party.describe_all,
        opens=frozenset(_purposes(read) | set(party.blobs_read)),
        seals=frozenset(_purposes(write)),
        hmac=party.keyed,
        blob_names=bool(party.blobs_read),
    )


def _roles() -> dict[str, Role]:
    roles = {s.name: _stage_role(s) for s in topology.STAGES}
    roles |= {p.name: _party_role(p) for p in topology.PARTIES if p.name != SEQUENCER}
    intakes = tuple(t for r in roles.values() for t in r.write if t.startswith(intake_topic("")))
    sequencer = topology.party(SEQUENCER)
    return roles | {SEQUENCER: _party_role(sequencer, intakes)}


ROLES: dict[str, Role] = _roles()

# Every audit intake topic (one per principal that audits); the sequencer reads them all.
INTAKES: tuple[str, ...] = tuple(
    t for r in ROLES.values() for t in r.write if t.startswith(intake_topic(""))
)

# A view for older callers: stage → (input, outputs). The topology is the source.
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    s.name: (s.input, s.outputs) for s in topology.STAGES
}


def topics(partitions: int) -> list[tuple[str, int, str]]:
    """Logical topic name, partition count and topic config for every topic of the stack."""
    # the audit trail is one chain: one partition, and so is each intake (one order per writer)
    out = [
        (t.name, 1 if t.name == AUDIT else partitions, t.config) for t in topology.TOPICS
    ]
    out.extend((name, 1, topology.topic(AUDIT).config) for name in INTAKES)
    # Changelogs of keyed state: compacted, co-partitioned with the stage's input.
    out.extend(
        (s.changelog, partitions, topology.CHANGELOG_CONFIG) for s in topology.STAGES if s.changelog
    )
    return out


def acl_lines(prefix: str, role: Role) -> list[str]:
    """Spec lines (see ``Bootstrap.java``) granting ``role`` exactly what it needs."""
    user = f"User:{role.name}"
    lines: list[str] = []

    def add(rtype: str, pattern: str, name: str, *ops: str) -> None:
        lines.extend(f"acl\t{user}\t{rtype}\t{pattern}\t{name}\t{op}" for op in ops)

    for topic in role.read:
        add("TOPIC", "LITERAL", prefix + topic, "READ", "DESCRIBE")
    for topic in role.write:
        add("TOPIC", "LITERAL", prefix + topic, "WRITE", "DESCRIBE")
    for group in role.groups:
        # the group itself and its dotted sub-groups; a bare prefix would also match every
        # group whose name merely starts the same ("alert" matching "alert-consumer")
        add("GROUP", "LITERAL", prefix + group, "READ", "DESCRIBE")
        add("GROUP", "PREFIXED", f"{prefix}{group}.", "READ", "DESCRIBE")
    if role.transactional:
        add("TRANSACTIONAL_ID", "PREFIXED", f"{prefix}{role.name}.", "WRITE", "DESCRIBE")
    if role.describe_all:
        add("TOPIC", "PREFIXED", prefix, "DESCRIBE")
        add("GROUP", "PREFIXED", prefix, "DESCRIBE")
    return lines


def spec(prefix: str, partitions: int) -> str:
    """The whole bootstrap spec: every topic and every role's ACLs under ``prefix``."""
    lines = [f"topic\t{prefix}{name}\t{n}\t{cfg}" for name, n, cfg in topics(partitions)]
    for role in ROLES.values():
        lines.extend(acl_lines(prefix, role))
    return "\n".join(lines) + "\n"


PRINCIPALS: tuple[str, ...] = (ADMIN, *ROLES)


def main(argv: list[str]) -> int:
    """``python -m shared.stack.principals OUT_DIR [PREFIX] [PARTITIONS]``: the bootstrap's
    inputs (spec.tsv and Bootstrap.java) for the Kubernetes bootstrap Job's init container."""
    import shutil
    from pathlib import Path

    if not argv:
        print("usage: python -m shared.stack.principals OUT_DIR [PREFIX] [PARTITIONS]")
        return 2
    out = Path(argv[0])
    prefix = argv[1] if len(argv) > 1 else "radstream."
    partitions = int(argv[2]) if len(argv) > 2 else 3
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.tsv").write_text(spec(prefix, partitions))
    source = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "Bootstrap.java"
    shutil.copyfile(source, out / "Bootstrap.java")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

"""Who may do what: one Kafka principal per service and per outside party, least privilege.

The access matrix is data: :func:`acl_spec` turns it into the topic and ACL lines that
``deploy/kafka/Bootstrap.java`` applies. Every name is under the topic prefix, so a test can
bootstrap an isolated copy of the whole matrix under its own prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN = "admin"


@dataclass(frozen=True)
class Role:
    """What one principal may do. Topics are logical names (``series``), groups and
    transactional-id prefixes are suffixes of the topic prefix."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # consumer groups it may join (prefixed match)
    transactional: bool = False  # may use transactional ids "<prefix><name>."
    describe_all: bool = False  # may describe every topic and group (lag, status)


# Stage services: read input, write outputs + dead letters + audit, own group and txn ids.
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ingest": ("instances", ("series",)),
    "preprocess": ("series", ("volumes",)),
    "segmentation": ("volumes", ("findings",)),
    "alert": ("findings", ("alerts",)),
}

ROLES: dict[str, Role] = {
    **{
        name: Role(
            name=name,
            read=(src, f"{name}.state"),
            write=(*outs, "deadletter", "audit", f"{name}.state"),
            groups=(name,),
            transactional=True,
        )
        for name, (src, outs) in STAGES.items()
    },
    # DICOM gateway: publishes instances for modalities (idempotent, not transactional).
    "gateway": Role(name="gateway", write=("instances", "audit")),
    # A scanner or its SDK: may only publish instances. It cannot read anything.
    "scanner": Role(name="scanner", write=("instances",)),
    # Worklist / pager integrations: read the alert feed and nothing else.
    "alert-consumer": Role(name="alert-consumer", read=("alerts",), groups=("alert-consumer",)),
    # Operators: read every topic (dead letters, results, status), describe groups for lag,
    # and write a stage's input topic to replay a series from that stage (a new revision).
    "operator": Role(
        name="operator",
        read=("instances", "series", "volumes", "findings", "alerts", "deadletter", "audit"),
        write=("series", "volumes", "findings", "audit"),
        groups=("operator",),
        describe_all=True,
    ),
}

TOPIC_CONFIG = {
    "instances": "max.message.bytes=16777216,retention.ms=604800000",
    "series": "max.message.bytes=16777216",
    "volumes": "max.message.bytes=16777216",
    "findings": "max.message.bytes=16777216",
    "alerts": "max.message.bytes=1048576",
    "deadletter": "retention.ms=2592000000",
    "audit": "retention.ms=31536000000",
}


def topics(partitions: int) -> list[tuple[str, int, str]]:
    """Logical topic name, partition count and topic config for every topic of the stack."""
    out = [(name, partitions, cfg) for name, cfg in TOPIC_CONFIG.items()]
    for stage in STAGES:
        # Changelog of the stage's keyed state: compacted, co-partitioned with its input.
        out.append(
            (f"{stage}.state", partitions, "cleanup.policy=compact,max.message.bytes=16777216")
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
        add("GROUP", "PREFIXED", prefix + group, "READ", "DESCRIBE")
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

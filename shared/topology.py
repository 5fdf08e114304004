"""RadStream's topology, written once: topics, stages, services, outside parties, ports.

Everything that names a stage, a topic, a principal or a port reads it from here:

* the services: each ``build()`` takes its :class:`Stage` (input topic, default output, other
  topics it emits to, whether it keeps keyed state) with :func:`stage`;
* the access matrix (``shared/stack/principals.py``) and through it the topic/ACL bootstrap
  (``deploy/kafka/Bootstrap.java``, local stack and compose): a stage reads its input, writes
  its outputs, dead letters and audit, owns its group and transactional ids, and its changelog
  if it is stateful; outside parties get what :data:`PARTIES` says;
* the local stack (``shared/stack/local.py``): which processes to start, as whom, on which
  ports; the CLI (``shared/cli/main.py``): lag per stage, which stages can be replayed.

A new stage is one :class:`Stage` entry in :data:`STAGES` plus its ``services/<name>/main.py``;
``tests/unit/test_topology.py`` checks that the services, the matrix and the stack agree.
Topic names here are logical: the deployment's prefix (``RADSTREAM_TOPIC_PREFIX``, default
``radstream.``) is put in front of every topic, group and transactional id.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIN = "admin"  # the bootstrap's super user; not a service, never used by one
DEADLETTER = "deadletter"
AUDIT = "audit"
BIG = "max.message.bytes=16777216"


# Key purposes: each has its own key pairs (shared/security/envelope.py). A principal holds
# the public key of every purpose it writes (it can seal, never open) and the private key of
# every purpose it reads; shared/stack/principals.py derives both from what follows.
INSTANCES = "instances"  # raw DICOM: the instances topic, instance blobs, ingest's state
SERIES = "series"  # SeriesReady records (UIDs, geometry, instance references)
VOLUMES = "volumes"  # VolumePrepared records and the volume blobs (pixels, no headers)
FINDINGS = "findings"  # findings records, masks, SEG, SR and overlay blobs
ALERTS = "alerts"  # alerts and results records (what the worklist and pagers read)
PURPOSES: tuple[str, ...] = (INSTANCES, SERIES, VOLUMES, FINDINGS, ALERTS, DEADLETTER, AUDIT)


@dataclass(frozen=True)
class Topic:
    name: str
    config: str  # broker topic config, "key=value,key=value"
    carries: str  # the record type (a name in shared.schemas) or what it holds
    purpose: str  # the key purpose its records are sealed for


TOPICS: tuple[Topic, ...] = (
    Topic("instances", f"{BIG},retention.ms=604800000", "InstancesRecord", INSTANCES),
    Topic("series", BIG, "SeriesReady", SERIES),
    Topic("volumes", BIG, "VolumePrepared", VOLUMES),
    Topic("findings", BIG, "SegmentationDone", FINDINGS),
    Topic("alerts", "max.message.bytes=1048576", "Alert", ALERTS),
    Topic("results", "max.message.bytes=1048576", "ResultsReady", ALERTS),
    Topic(DEADLETTER, "retention.ms=2592000000", "DeadLetter", DEADLETTER),
    # what people did with alerts on the worklist (acknowledged, by whom, when); keyed like
    # the alert, so an alert and its acknowledgements share a partition
    Topic("acks", "retention.ms=31536000000", "AlertAck", ALERTS),
    # the hash-chained trail: one partition (one chain), written by the sequencer only
    Topic(AUDIT, "retention.ms=31536000000", "AuditEntry", AUDIT),
)
CHANGELOG_CONFIG = f"cleanup.policy=compact,{BIG}"


@dataclass(frozen=True)
class Stage:
    """A stage service: consumes ``input``, produces ``output`` (and ``emits``) in one
    transaction per batch. Its name is also its service, Kafka principal, consumer group and
    transactional-id prefix."""

    name: str
    input: str
    output: str | None
    emits: tuple[str, ...] = ()  # other topics the handler sends to (Emit), besides dead letters
    stateful: bool = False  # keyed state in the compacted changelog ``<name>.state``
    replay: bool = False  # an operator may re-run a series from here (writes ``input``)
    delivers: tuple[str, ...] = ()  # outside systems it sends to ("pacs": the local stack's
    # Orthanc via RADSTREAM_<NAME>__PACS_HOST/PORT; "webhook", "fhir", "hl7": endpoints named
    # in RADSTREAM_NOTIFY__TARGETS_FILE)
    state_purpose: str | None = None  # key purpose of its changelog (stateful stages)
    blobs_read: tuple[str, ...] = ()  # purposes of the blobs it reads (claim checks)
    blobs_written: tuple[str, ...] = ()  # purposes of the blobs it stores

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every topic the handler may produce to (default output first)."""
        return (*((self.output,) if self.output else ()), *self.emits)

    @property
    def changelog(self) -> str | None:
        return f"{self.name}.state" if self.stateful else None


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "instances",
        "series",
        emits=(AUDIT,),
        stateful=True,
        state_purpose=INSTANCES,
        blobs_written=(INSTANCES,),
    ),
    Stage(
        "preprocess",
        "series",
        "volumes",
        replay=True,
        blobs_read=(INSTANCES,),
        blobs_written=(VOLUMES,),
    ),
    Stage(
        "segmentation",
        "volumes",
        "findings",
        replay=True,
        blobs_read=(VOLUMES,),
        blobs_written=(FINDINGS,),
    ),
    # Not replayable: re-evaluating rules is a replay from segmentation (the operator never
    # writes findings).
    Stage("alert", "findings", "alerts", emits=(AUDIT,), stateful=True, state_purpose=ALERTS),
    # the paperwork after the alert: DICOM SEG + SR + pictures, delivered to the PACS; the SEG
    # and SR copy the source instances' patient and study attributes, so it reads them
    Stage(
        "results",
        "findings",
        "results",
        emits=(AUDIT,),
        delivers=("pacs",),
        blobs_read=(INSTANCES, VOLUMES, FINDINGS),
        blobs_written=(FINDINGS,),
    ),
    # notifications that reach people: each alert to the webhooks, FHIR servers and HL7
    # interface engines its rule's routes name (services/notify); delivered ids are its state
    Stage(
        "notify",
        "alerts",
        None,
        emits=(AUDIT,),
        stateful=True,
        delivers=("webhook", "fhir", "hl7"),
        state_purpose=ALERTS,
    ),
)


@dataclass(frozen=True)
class Party:
    """A principal that is not a stage: the gateway service, and outside parties."""

    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # consumer groups it may join (prefixed match)
    describe_all: bool = False  # may describe every topic and group (lag, status)
    transactional: bool = False  # may use transactional ids "<prefix><name>."
    blobs_read: tuple[str, ...] = ()  # purposes of the blobs it reads
    keyed: bool = False  # makes Kafka keys / keyed hashes of UIDs (holds the HMAC key)


PARTIES: tuple[Party, ...] = (
    # DICOM gateway: publishes instances for modalities (idempotent, not transactional), and
    # dead-letters the STOW-RS parts it refuses itself
    Party("gateway", write=("instances", DEADLETTER, AUDIT), keyed=True),
    # A scanner or its SDK: may only publish instances. It cannot read anything.
    Party("scanner", write=("instances",), keyed=True),
    # Worklist / pager integrations: read the alert feed and the results records they join to
    # it (SEG/SR identities, delivery outcome), nothing else.
    Party("alert-consumer", read=("alerts", "results"), write=(AUDIT,), groups=("alert-consumer",)),
    # The worklist web app (services/worklist): reads the alert feed, the results it joins to
    # it (overlay pictures, the SEG's patient identity, shown to clinicians only) and the
    # acknowledgements (its own, other instances'); writes acknowledgements and their audit.
    # Blobs it opens: the results' pictures and SEG (findings purpose), never images. It
    # makes no keyed hashes: an acknowledgement is keyed with its alert's key.
    Party(
        "worklist",
        read=("alerts", "results", "acks"),
        write=("acks", AUDIT),
        groups=("worklist",),
        blobs_read=(FINDINGS,),
    ),
    # Operators: read the stages' records (never the raw instances), describe groups for lag,
    # and write the input of a replayable stage to re-run a series from there (a new
    # revision). They read the SEG, SR and pictures (findings blobs), not images.
    Party(
        "operator",
        read=tuple(t.name for t in TOPICS if t.name not in ("instances", AUDIT)),
        write=(*(s.input for s in STAGES if s.replay), AUDIT),
        groups=("operator",),
        describe_all=True,
        blobs_read=(FINDINGS,),
        keyed=True,
    ),
    # Research export (radstream export --deidentify): reads a series' findings and results
    # and the source instances and SEG/SR from the blob store, writes de-identified copies.
    Party(
        "exporter",
        read=("findings", "results"),
        write=(AUDIT,),
        blobs_read=(INSTANCES, FINDINGS),
        keyed=True,
    ),
    # Auditors: read (and verify) the audit trail, nothing else.
    Party("auditor", read=(AUDIT,), groups=("auditor",)),
    # The audit sequencer (services/auditlog): reads every principal's intake topic
    # ``audit.in.<principal>`` (shared/stack/principals.py adds those reads), reads the head of
    # the chain and is the only writer of the hash-chained ``audit`` topic.
    Party("auditlog", read=(AUDIT,), write=(AUDIT,), groups=("auditlog",), transactional=True),
    # The key administrator (radstream keys ...): audits its key operations, nothing else.
    Party("keyadmin", write=(AUDIT,)),
)


@dataclass(frozen=True)
class Service:
    """A process of the stack: a stage, the gateway or the worklist; runs as the principal of
    its name."""

    name: str
    module: str
    metrics_port: int  # the local stack's default /metrics, /healthz, /readyz port
    env: tuple[tuple[str, str], ...] = ()  # local-stack defaults, the caller's env wins

    @property
    def principal(self) -> str:
        return self.name

    @property
    def stage(self) -> Stage | None:
        return next((s for s in STAGES if s.name == self.name), None)


@dataclass(frozen=True)
class Ports:
    """The local stack's well-known ports (``radstream stack up``; deploy/prometheus)."""

    kafka: int = 19093  # SASL_SSL listener
    controller: int = 19094  # KRaft controller, PLAINTEXT on 127.0.0.1
    gateway_dicom: int = 11112
    orthanc_http: int = 8042
    orthanc_dicom: int = 4242
    worklist_https: int = 8443  # the worklist web app (TLS)
    gateway_stow: int = 11443  # the gateway's DICOMweb STOW-RS endpoint (TLS)


PORTS = Ports()
GATEWAY_AE_TITLE = "RADSTREAM"

# Pipeline order; metrics ports 9101.. in that order.
SERVICES: tuple[Service, ...] = (
    Service(
        "gateway",
        "services.gateway.main",
        9101,
        (
            ("RADSTREAM_GATEWAY__ALLOWED_AE_TITLES", "STORESCU,ECHOSCU,RADSTREAM-DEMO"),
            # the local demo only: plain DICOM on 127.0.0.1 (everywhere else mutual TLS)
            ("RADSTREAM_GATEWAY__PLAIN_DICOM", "true"),
            ("RADSTREAM_GATEWAY__ALLOWED_ADDRESSES", "127.0.0.1"),
        ),
    ),
    *(
        Service(s.name, f"services.{s.name}.main", 9102 + i)
        for i, s in enumerate(STAGES)
    ),
    # after the stages: 9102 + len(STAGES)
    Service("worklist", "services.worklist.main", 9102 + len(STAGES)),
    # the audit sequencer: chains every principal's audit events into ``audit``
    Service("auditlog", "services.auditlog.main", 9103 + len(STAGES)),
)


def stage(name: str) -> Stage:
    """The stage called ``name``; KeyError names the known ones."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def service(name: str) -> Service:
    for s in SERVICES:
        if s.name == name:
            return s
    raise KeyError(f"no service {name!r}; services: {', '.join(s.name for s in SERVICES)}")


def party(name: str) -> Party:
    for p in PARTIES:
        if p.name == name:
            return p
    raise KeyError(f"no party {name!r}; parties: {', '.join(p.name for p in PARTIES)}")


def topic(name: str) -> Topic:
    for t in TOPICS:
        if t.name == name:
            return t
    raise KeyError(f"no topic {name!r}")


def _purposes_by_name() -> dict[str, str]:
    out = {t.name: t.purpose for t in TOPICS}
    for s in STAGES:
        if s.changelog:
            out[s.changelog] = s.state_purpose or s.name
    return out


def purpose_of(topic_name: str) -> str:
    """The key purpose of a topic, by its logical name or its full name under any prefix
    (``radstream.alert.state`` → ``alerts``); KeyError for a topic RadStream does not know."""
    if f".{AUDIT}.in." in f".{topic_name}":  # a principal's audit intake (audit.in.results)
        return AUDIT
    names = _purposes_by_name()
    longest_first = sorted(names, key=len, reverse=True)
    for name in longest_first:
        if topic_name == name or topic_name.endswith("." + name):
            return names[name]
    # a sub-topic of a known one (``radstream.audit.in.ingest``, ``...deadletter.review``)
    for name in longest_first:
        if f".{name}." in f".{topic_name}.":
            return names[name]
    raise KeyError(f"no key purpose for topic {topic_name!r}")


TOPIC_NAMES: tuple[str, ...] = tuple(t.name for t in TOPICS)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

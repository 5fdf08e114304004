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


@dataclass(frozen=True)
class Topic:
    name: str
    config: str  # broker topic config, "key=value,key=value"
    carries: str  # the record type (a name in shared.schemas) or what it holds


TOPICS: tuple[Topic, ...] = (
    Topic("instances", f"{BIG},retention.ms=604800000", "InstancesRecord"),
    Topic("series", BIG, "SeriesReady"),
    Topic("volumes", BIG, "VolumePrepared"),
    Topic("findings", BIG, "SegmentationDone"),
    Topic("alerts", "max.message.bytes=1048576", "Alert"),
    Topic("results", "max.message.bytes=1048576", "ResultsReady"),
    Topic(DEADLETTER, "retention.ms=2592000000", "DeadLetter"),
    Topic(AUDIT, "retention.ms=31536000000", "AuditEvent"),
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

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every topic the handler may produce to (default output first)."""
        return (*((self.output,) if self.output else ()), *self.emits)

    @property
    def changelog(self) -> str | None:
        return f"{self.name}.state" if self.stateful else None


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "instances", "series", emits=(AUDIT,), stateful=True),
    Stage("preprocess", "series", "volumes", replay=True),
    Stage("segmentation", "volumes", "findings", replay=True),
    Stage("alert", "findings", "alerts", emits=(AUDIT,), stateful=True, replay=True),
    # the paperwork after the alert: DICOM SEG + SR + pictures, delivered to the PACS
    Stage("results", "findings", "results", emits=(AUDIT,), delivers=("pacs",)),
    # notifications that reach people: each alert to the webhooks, FHIR servers and HL7
    # interface engines its rule's routes name (services/notify); delivered ids are its state
    Stage(
        "notify", "alerts", None, emits=(AUDIT,), stateful=True, delivers=("webhook", "fhir", "hl7")
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


PARTIES: tuple[Party, ...] = (
    # DICOM gateway: publishes instances for modalities (idempotent, not transactional)
    Party("gateway", write=("instances", AUDIT)),
    # A scanner or its SDK: may only publish instances. It cannot read anything.
    Party("scanner", write=("instances",)),
    # Worklist / pager integrations: read the alert feed and the results records they join to
    # it (SEG/SR identities, delivery outcome), nothing else.
    Party("alert-consumer", read=("alerts", "results"), groups=("alert-consumer",)),
    # Operators: read every topic, describe groups for lag, and write the input of a
    # replayable stage to re-run a series from there (a new revision).
    Party(
        "operator",
        read=tuple(t.name for t in TOPICS),
        write=(*(s.input for s in STAGES if s.replay), AUDIT),
        groups=("operator",),
        describe_all=True,
    ),
)


@dataclass(frozen=True)
class Service:
    """A process of the stack: a stage or the gateway; runs as the principal of its name."""

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


PORTS = Ports()
GATEWAY_AE_TITLE = "RADSTREAM"

# Pipeline order; metrics ports 9101.. in that order.
SERVICES: tuple[Service, ...] = (
    Service(
        "gateway",
        "services.gateway.main",
        9101,
        (("RADSTREAM_GATEWAY__ALLOWED_AE_TITLES", "STORESCU,ECHOSCU,RADSTREAM-DEMO"),),
    ),
    *(
        Service(s.name, f"services.{s.name}.main", 9102 + i)
        for i, s in enumerate(STAGES)
    ),
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


TOPIC_NAMES: tuple[str, ...] = tuple(t.name for t in TOPICS)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

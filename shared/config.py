"""Settings, built once in a service's ``main`` from ``RADSTREAM_*`` variables and passed in."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.topology import GATEWAY_AE_TITLE, PORTS

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may keep busy: its affinity mask, bounded by the CPU quotas of its
    cgroup and the cgroups above it (a container's CPU limit: ``cpu.max`` in cgroup v2, found
    from the process's own path in ``/proc/self/cgroup``; ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` in v1), rounded up; at least 1. Unreadable or unlimited quotas leave
    the affinity count. ``cgroup_root`` defaults to :data:`CGROUP_ROOT`."""
    root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quotas = [q for d in _v2_dirs(root, proc_cgroup) if (q := _v2_quota(d)) is not None]
    if not quotas:
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            if q > 0 and period > 0:
                quotas.append(q / period)
        except (OSError, ValueError):
            pass
    n = cpus or 1
    if quotas:
        n = min(n, math.ceil(min(quotas)))
    return max(1, n)


def _v2_dirs(root: Path, proc_cgroup: Path | None) -> list[Path]:
    """The process's cgroup v2 directory and every one above it, up to ``root``."""
    dirs = [root]
    try:
        for line in (proc_cgroup or Path("/proc/self/cgroup")).read_text().splitlines():
            if line.startswith("0::"):
                parts = [p for p in line[3:].strip().split("/") if p]
                dirs += [root.joinpath(*parts[:k]) for k in range(1, len(parts) + 1)]
    except OSError:
        pass
    return dirs


def _v2_quota(d: Path) -> float | None:
    try:
        fields = (d / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return max(int(fields[0]), 1) / int(fields[1])
    except (OSError, ValueError):
        pass
    return None


def default_threads() -> int:
    """Host threads for a stage's parallel decode and slab work: the usable CPUs, at most 8
    (past that, more decode threads starve the thread that feeds the device and the
    service's own consumer)."""
    return min(8, usable_cpus())


class KafkaSettings(BaseModel):
    """How a client reaches the broker and who it is there (``RADSTREAM_KAFKA__*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        f"127.0.0.1:{PORTS.kafka}", description="SASL_SSL listener host:port"
    )
    security_protocol: str = Field("SASL_SSL", description="SASL_SSL (production) or PLAINTEXT")
    sasl_mechanism: str = Field("SCRAM-SHA-512", description="SASL mechanism")
    username: str = Field("", description="Kafka principal name of this service or party")
    password: SecretStr = Field(SecretStr(""), description="SCRAM password of the principal")
    password_file: Path | None = Field(None, description="file holding the password (secrets)")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signed the broker cert")
    max_message_bytes: int = Field(8 * 1024 * 1024, description="largest record sent or fetched")


class IngestSettings(BaseModel):
    """``RADSTREAM_INGEST__*``: series assembly and instance validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inactivity_timeout_s: float = Field(30.0, description="complete a series with no marker")
    late_quiet_s: float = Field(5.0, description="quiet time before a late revision is sent")
    retention_s: float = Field(
        86400.0,
        description="keep a completed series' instance list this long after its last change "
        "(late and changed instances make a full revision n+1), then only its fingerprint; "
        "its raw instance blobs are deleted then too (delete_raw_blobs)",
    )
    delete_raw_blobs: bool = Field(
        True,
        description="raw blob retention: delete a series' raw DICOM blobs when its instance "
        "list is compacted (retention_s after its last change), when it is refused, and what a "
        "duplicate re-send stored after compaction",
    )
    fingerprint_retention_s: float = Field(
        30 * 86400.0,
        description="keep a completed series' fingerprint (digest-set hash + count, ~200 B) "
        "this long after it was last seen: re-sends within it are recognised as duplicates",
    )
    max_instance_bytes: int = Field(64 * 1024 * 1024, description="largest instance accepted")
    max_inflated_bytes: int = Field(
        64 * 1024 * 1024, description="largest Deflated dataset once inflated (streamed, capped)"
    )
    max_elements: int = Field(200_000, description="most data elements in one instance")
    max_items: int = Field(100_000, description="most sequence items + pixel fragments")
    max_sequence_depth: int = Field(12, description="deepest sequence nesting accepted")
    max_frame_pixels: int = Field(
        32 * 1024 * 1024, description="largest frame (Rows x Columns) accepted"
    )
    max_series_instances: int = Field(
        10_000,
        description="most instances in one series: past it the series is refused "
        "(series_too_large), so its state stays far below the broker's message cap",
    )
    max_series_bytes: int = Field(
        8 * 1024**3, description="most instance bytes in one series (series_too_large past it)"
    )


class StowSender(BaseModel):
    """One DICOMweb sender allowed to STOW-RS to the gateway. It authenticates with a bearer
    token (only its SHA-256 is configured), with a client certificate (mutual TLS, matched by
    the certificate's subject common name), or with both when both are set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9._-]+$", description="sender name")
    token_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the sender's bearer token"
    )
    client_cn: str | None = Field(
        None, max_length=256, description="subject CN of the sender's client certificate"
    )
    rate_per_s: float = Field(5.0, gt=0, description="requests per second, sustained")
    burst: int = Field(20, ge=1, description="requests allowed at once above the rate")


class StowSettings(BaseModel):
    """``RADSTREAM_GATEWAY__STOW__*``: the DICOMweb STOW-RS endpoint (HTTPS) of the gateway."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int | None = Field(None, description="HTTPS port of POST /dicom-web/studies; unset: off")
    host: str = Field("127.0.0.1", description="address to listen on")
    tls_cert: Path | None = Field(None, description="PEM server certificate (required)")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    client_ca: Path | None = Field(
        None, description="PEM CA bundle of client certificates: enables mutual TLS"
    )
    senders: list[StowSender] = Field(
        default_factory=list, description='JSON list: [{"name", "token_sha256", "client_cn"}]'
    )
    max_request_bytes: int = Field(512 * 1024 * 1024, ge=1, description="largest request body")
    max_part_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="largest instance (part); also capped by the Kafka message size",
    )
    max_parts: int = Field(10000, ge=1, description="most instances in one request")
    max_sequence_depth: int = Field(12, description="deepest sequence nesting accepted")
    window: int = Field(
        16,
        ge=1,
        description="instances held at once (read, not yet acknowledged by Kafka), all "
        "requests together: the endpoint's memory is about window x the part cap",
    )


class GatewaySettings(BaseModel):
    """``RADSTREAM_GATEWAY__*``: the DICOM C-STORE gateway (and its STOW-RS endpoint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str = Field(GATEWAY_AE_TITLE, max_length=16, description="our AE title")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(PORTS.gateway_dicom, description="DICOM port")
    allowed_ae_titles: str = Field("", description="comma-separated calling AE titles allowed")
    allowed_addresses: str = Field(
        "", description="comma-separated peer IPs or CIDR networks allowed (empty: any)"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate: require DICOM TLS")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle that signs the modalities' client certificates"
    )
    require_client_cert: bool = Field(
        True, description="mutual TLS: a peer without a certificate signed by tls_ca is refused"
    )
    plain_dicom: bool = Field(
        False,
        description="accept DICOM without TLS (the local demo only; everywhere else the "
        "gateway refuses to start without tls_cert, and without tls_ca unless "
        "require_client_cert is off)",
    )
    max_pdu_bytes: int = Field(
        256 * 1024, description="largest PDU accepted (and the maximum length advertised)"
    )
    max_dataset_bytes: int = Field(
        64 * 1024 * 1024, description="largest dataset one C-STORE may send (P-DATA bytes)"
    )
    peer_associations_per_minute: float = Field(
        120.0, description="associations one peer address may open per minute (0: no limit)"
    )
    peer_instances_per_second: float = Field(
        200.0, description="C-STOREs one peer address may send per second (0: no limit)"
    )
    source: str = Field("gateway", max_length=64, description="source name put on instances")
    ack_timeout_s: float = Field(30.0, description="longest wait for Kafka before failing")
    stow: StowSettings = Field(default_factory=StowSettings)


class PreprocessSettings(BaseModel):
    """``RADSTREAM_PREPROCESS__*``: the calibration and image-processing chain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chains: str = Field(
        "",
        description='JSON {"CT:CHEST": [{"op": "gaussian", "sigma": [0, 0.7, 0.7]}], ...} '
        "overriding the default chain per MODALITY[:BODYPART]",
    )
    gpu_memory_limit_bytes: int = Field(8 * 1024**3, description="CuPy memory pool cap")
    threads: int = Field(
        default_factory=default_threads,
        ge=1,
        description="CPU threads for decoding and slab-wise filtering; by default the CPUs "
        "this process may use (affinity and the container's CPU limit), at most 8",
    )
    warmup_shapes: str = Field("512x512", description="in-plane shapes to warm GPU kernels for")
    max_voxels: int = Field(
        600 * 512 * 512,
        description="largest volume accepted, judged from the headers before any decode",
    )
    max_frame_pixels: int = Field(
        32 * 1024 * 1024, description="largest frame (Rows x Columns) decoded"
    )
    compression_level: int = Field(
        0,
        description="zstd level of the stored volume (negative: zstd's fast levels); 0 stores "
        "it uncompressed: the volume is transient and read back within seconds, and on a busy "
        "CPU compressing it costs the alert more than writing the extra bytes",
    )


class SegmentationSettings(BaseModel):
    """``RADSTREAM_SEGMENTATION__*``: the classical tasks and the ONNX model plug-in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    onnx_model: Path | None = Field(None, description="ONNX segmentation model to run too")
    onnx_config: str = Field(
        "",
        description='JSON: {"name", "modalities", "body_parts", "input_size": [h, w], '
        '"window": [center, width], "normalize": "minmax|zscore", "labels": [...]}',
    )


class AlertSettings(BaseModel):
    """``RADSTREAM_ALERT__*``: the rules that turn findings into alerts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules_file: Path = Field(
        Path(__file__).resolve().parents[1] / "deploy" / "alerts" / "rules.yaml"
    )
    raised_retention_s: float = Field(
        90 * 86400.0,
        description="keep a series' raised alert ids this long after its last alert (no alert "
        "id is published twice within it); longer than ingest's fingerprint retention",
    )


class ResultsSettings(BaseModel):
    """``RADSTREAM_RESULTS__*``: the DICOM SEG, SR and pictures, and their delivery to the PACS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pacs_host: str = Field("", description="PACS for the SEG and SR (C-STORE); empty: none")
    pacs_port: int = Field(PORTS.orthanc_dicom)
    pacs_ae_title: str = Field("ORTHANC", max_length=16)
    calling_ae_title: str = Field("RADSTREAM", max_length=16)
    pacs_timeout_s: float = Field(20.0)
    pacs_protocol: Literal["dimse", "dicomweb"] = Field(
        "dimse",
        description="how the SEG and SR reach the PACS: C-FIND + C-STORE (pacs_host/port) or "
        "QIDO-RS + STOW-RS (dicomweb_url)",
    )
    dicomweb_url: str = Field(
        "",
        description="DICOMweb service root of the PACS, e.g. https://pacs/dicom-web (required "
        "with pacs_protocol dicomweb; plain http beyond loopback needs pacs_allow_plaintext)",
    )
    dicomweb_token: SecretStr = Field(SecretStr(""), description="bearer token for the PACS")
    dicomweb_ca_file: Path | None = Field(None, description="CA bundle for an https url")
    dicomweb_client_cert: Path | None = Field(None, description="PEM client cert (mutual TLS)")
    dicomweb_client_key: Path | None = Field(None, description="PEM key for the client cert")
    pacs_tls_ca: Path | None = Field(
        None, description="PEM CA of the PACS' certificate: C-FIND/C-STORE over DICOM TLS"
    )
    pacs_tls_cert: Path | None = Field(
        None, description="PEM client certificate for a PACS that requires mutual TLS"
    )
    pacs_tls_key: Path | None = Field(None, description="PEM private key for pacs_tls_cert")
    pacs_allow_plaintext: bool = Field(
        False,
        description="send to a PACS beyond loopback without TLS (a PACS on the same trusted "
        "network only, as compose's Orthanc); without it such a PACS is refused at start",
    )
    seg_max_frames: int = Field(
        400, ge=1, description="organ segments join the SEG only while it stays this small"
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness the service adds to itself at start: the paperwork (SEG, SR, "
        "pictures) runs after the alert and yields the CPU to the stages on the alert's path "
        "where they share a machine; 0 leaves it alone",
    )

    @model_validator(mode="after")
    def _dicomweb_needs_a_url(self) -> ResultsSettings:
        if self.pacs_protocol == "dicomweb" and not self.dicomweb_url:
            raise ValueError("pacs_protocol dicomweb needs dicomweb_url")
        return self


class NotifySettings(BaseModel):
    """``RADSTREAM_NOTIFY__*``: where alerts are delivered (webhooks, FHIR, HL7 v2 over MLLP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    targets_file: Path = Field(
        Path(__file__).resolve().parents[1] / "deploy" / "notify" / "targets.yaml",
        description="YAML: the endpoints and the rule routes each serves (secrets by file)",
    )
    timeout_s: float = Field(10.0, gt=0, description="connect + answer timeout of one attempt")
    delivered_retention_s: float = Field(
        90 * 86400.0,
        description="remember an alert's delivered targets this long (no re-send within it)",
    )
    breaker_failures: int = Field(
        3,
        ge=0,
        description="alerts in a row that gave up on a target before it is skipped for the "
        "cool-down (its alerts dead-lettered at once, not retried); 0: never skipped",
    )
    breaker_cooldown_s: float = Field(60.0, gt=0, description="how long a failing target rests")


class WorklistSettings(BaseModel):
    """``RADSTREAM_WORKLIST__*``: the worklist web app (HTTPS only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="address of the HTTPS listener")
    port: int = Field(PORTS.worklist_https, description="HTTPS port; 0 picks a free one")
    tls_cert: Path | None = Field(None, description="PEM certificate chain (required)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (required)")
    users_file: Path | None = Field(
        None, description="accounts: argon2id hashes and roles; default <home>/secrets"
    )
    session_ttl_s: float = Field(8 * 3600.0, description="a login lasts this long")
    lookback_s: float = Field(
        7 * 86400.0, description="alerts (and their results and acks) shown from this far back"
    )
    max_alerts: int = Field(500, ge=1, description="alerts kept in memory, newest first")
    source: str = Field("worklist", max_length=64, description="name put on acknowledgements")
    oidc_issuer: str = Field(
        "", description="OIDC issuer whose bearer tokens are accepted (empty: none)"
    )
    oidc_audience: str = Field("radstream-worklist", description="the tokens' audience")
    oidc_jwks_file: Path | None = Field(None, description="the issuer's JWKS (JSON file)")
    oidc_roles_claim: str = Field("roles", description="claim listing the user's roles")


class Settings(BaseSettings):
    """Everything a RadStream process needs; secrets are ``SecretStr`` and never logged."""

    model_config = SettingsConfigDict(
        env_prefix="RADSTREAM_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    home: Path = Field(Path(".radstream"), description="state, data, logs and secrets folder")
    topic_prefix: str = Field("radstream.", description="prefix of every topic, group, txn id")
    keyring_file: Path | None = Field(
        None,
        description="this principal's key file (0600; shared/security/keyfile.py); default "
        "<home>/secrets/keyring.json",
    )
    kek: Literal["file", "kms"] = Field(
        "file",
        description="who opens with the private keys: the key file's own, or a KMS "
        "(shared/security/kek.py) that keeps them",
    )
    kms_socket: Path | None = Field(None, description="the KMS's Unix socket (kek=kms)")
    kms_token_file: Path | None = Field(
        None, description="file with this principal's KMS token (0600; kek=kms)"
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    segmentation: SegmentationSettings = Field(default_factory=SegmentationSettings)
    alert: AlertSettings = Field(default_factory=AlertSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    worklist: WorklistSettings = Field(default_factory=WorklistSettings)
    device: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="RADSTREAM_DEVICE: array backend"
    )
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    blob_dir: Path | None = Field(None, description="local blob store; default <home>/blobs")
    metrics_host: str = Field("127.0.0.1", description="address of /metrics, /healthz, /readyz")
    metrics_port: int = Field(0, description="port of the HTTP endpoint; 0 picks a free one")
    batch_max_records: int = Field(500, description="records handled per transaction at most")
    batch_max_bytes: int = Field(16 * 1024 * 1024, description="input bytes per transaction")
    commit_on_output: bool = Field(
        True,
        description="end a transaction right after a record that produced output for the next "
        "stage (a SeriesReady, a volume, findings, an alert), so it need not wait for the rest "
        "of the batch; records that only change state or are dead-lettered keep batching",
    )
    fetch_max_wait_ms: int = Field(
        100,
        description="longest the broker holds a fetch that has less than fetch_min_bytes; a "
        "committed transaction completes a waiting fetch at once, so this bounds idle polling, "
        "not latency",
    )
    fetch_min_bytes: int = Field(1, description="bytes a fetch waits for (1: any record)")
    producer_linger_ms: int = Field(
        0, description="batching delay of the stage's producers (commit flushes anyway)"
    )
    producer_retry_backoff_ms: int = Field(
        20,
        description="wait before retrying a producer or transaction request (e.g. a new "
        "transaction's request meeting the previous one's markers: CONCURRENT_TRANSACTIONS)",
    )
    retry_attempts: int = Field(5, description="attempts for a retriable error before DLQ")
    retry_backoff_s: float = Field(0.2, description="first retry delay; doubles per attempt")
    retry_backoff_max_s: float = Field(5.0, description="largest retry delay")
    max_poll_interval_s: float = Field(600.0, description="longest handler time per batch")
    session_timeout_s: float = Field(10.0, description="group session timeout")
    shutdown_timeout_s: float = Field(8.0, description="bound on a graceful stop")
    handler_threads: int = Field(2, description="threads for synchronous (CPU) handlers")

    def topic(self, name: str) -> str:
        """Full topic name for a logical topic (``series`` → ``radstream.series``)."""
        return f"{self.topic_prefix}{name}"

    def audit_topic(self) -> str:
        """Where this principal's audit events go: its own intake topic
        ``audit.in.<username>`` (only it may write there, so the audit sequencer knows who wrote
        each event: shared/security/audit.py); ``audit`` itself for a principal without one."""
        from shared.stack.principals import ROLES

        intake = f"audit.in.{self.kafka.username}"
        role = ROLES.get(self.kafka.username)
        return self.topic(intake if role is not None and intake in role.write else "audit")

    def writer_topic(self, name: str) -> str:
        """:meth:`topic` for what this principal writes: ``audit`` is its intake topic."""
        return self.audit_topic() if name == "audit" else self.topic(name)

    @property
    def blob_path(self) -> Path:
        return self.blob_dir or self.home / "blobs"

    @property
    def keyring_path(self) -> Path:
        return self.keyring_file or self.home / "secrets" / "keyring.json"

    @property
    def worklist_users_path(self) -> Path:
        return self.worklist.users_file or self.home / "secrets" / "worklist-users.json"

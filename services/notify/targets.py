"""Where alerts go: the notification targets and the rule routes each one serves.

A rule names routes (``deploy/alerts/rules.yaml``: ``pager``, ``worklist``, ``webhook:<name>``);
the targets file (``RADSTREAM_NOTIFY__TARGETS_FILE``, default ``deploy/notify/targets.yaml``)
says which endpoints serve which routes::

    targets:
      - name: oncall                  # [a-z0-9-]: a metric-safe, PHI-free name
        channel: webhook
        routes: [pager]               # alerts whose rule routes to pager
        min_severity: high            # optional: and only high or critical ones
        url: https://pager.example.org/hooks/radstream
        secret_file: /secrets/oncall.webhook   # HMAC key, read at start, never logged
      - name: ehr
        channel: fhir
        routes: [worklist, pager]
        base_url: https://fhir.example.org/r4  # a Bundle transaction is POSTed here
        token_file: /secrets/ehr.token         # optional bearer token
      - name: ris
        channel: hl7
        routes: [pager]
        host: ie.example.org
        port: 2575
        tls: true                     # MLLP inside TLS (ca_file: a private CA bundle)

A target also serves the route ``<channel>:<name>`` (``webhook:oncall``) without listing it.
Secrets live in files and are read once, into ``SecretStr``. Alerts carry study identities, so
plain ``http://`` and MLLP without TLS are refused beyond loopback unless the target says
``allow_plaintext: true`` (an interface engine on a closed hospital network).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.schemas import Alert
from shared.security.envelope import KeyFileError
from shared.security.keyfile import read_secret_file

SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _check_url(url: str, allow_plaintext: bool) -> None:
    """Alerts carry study identities: plain http only to this machine, or when a site says so."""
    parts = urlsplit(url)
    if parts.scheme == "http" and not loopback(parts.hostname) and not allow_plaintext:
        raise ValueError(
            f"{parts.hostname}: plain http beyond loopback needs allow_plaintext: true (use https)"
        )


def read_secret(path: Path) -> SecretStr:
    """A secret from a file that only its owner may read (the same check as the Kafka password
    and key files); the path and the problem, never the value, in errors."""
    try:
        value = read_secret_file(path)
    except KeyFileError as exc:
        raise ValueError(f"secret file {path}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {type(exc).__name__}") from None
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return SecretStr(value)


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="metric-safe name")
    routes: list[str] = Field(default_factory=list, description="rule routes it serves")
    min_severity: Literal["low", "medium", "high", "critical"] = "low"
    ca_file: Path | None = Field(None, description="PEM CA bundle for an https/TLS endpoint")
    allow_plaintext: bool = Field(
        False, description="permit http:// or MLLP without TLS to a host other than loopback"
    )

    def serves(self, alert: Alert, channel: str) -> bool:
        if SEVERITY_RANK[alert.severity] < SEVERITY_RANK[self.min_severity]:
            return False
        own = f"{channel}:{self.name}"
        return any(r == own or r in self.routes for r in alert.routes)


class WebhookTarget(_Target):
    channel: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", description="the receiver's URL")
    secret_file: Path = Field(description="file holding the HMAC-SHA256 key (mode 0600)")
    previous_secret_file: Path | None = Field(
        None,
        description="while the key rotates: the old key; requests carry both signatures, so "
        "receivers verify with either until they have the new one",
    )
    secret: SecretStr = Field(SecretStr(""), exclude=True, description="read from secret_file")
    previous_secret: SecretStr | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _load_secret(self) -> WebhookTarget:
        _check_url(self.url, self.allow_plaintext)
        if not self.secret.get_secret_value():
            object.__setattr__(self, "secret", read_secret(self.secret_file))
        if self.previous_secret is None and self.previous_secret_file is not None:
            object.__setattr__(self, "previous_secret", read_secret(self.previous_secret_file))
        return self

    def keys(self) -> list[bytes]:
        """The signing keys: the current one first."""
        keys = [self.secret.get_secret_value().encode()]
        if self.previous_secret is not None:
            keys.append(self.previous_secret.get_secret_value().encode())
        return keys


class FhirTarget(_Target):
    channel: Literal["fhir"]
    base_url: str = Field(pattern=r"^https?://", description="FHIR R4 base; transactions go here")
    token_file: Path | None = Field(None, description="file holding a bearer token")
    token: SecretStr | None = Field(None, exclude=True, description="read from token_file")

    @model_validator(mode="after")
    def _load_token(self) -> FhirTarget:
        _check_url(self.base_url, self.allow_plaintext)
        if self.token is None and self.token_file is not None:
            object.__setattr__(self, "token", read_secret(self.token_file))
        return self


class Hl7Target(_Target):
    channel: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(False, description="MLLP inside TLS (verified against ca_file or the system)")
    sending_application: str = Field("RADSTREAM", pattern=r"^[A-Za-z0-9_.-]{1,20}$")
    sending_facility: str = Field("RADSTREAM", pattern=r"^[A-Za-z0-9_.-]{1,20}$")
    receiving_application: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,20}$")
    receiving_facility: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,20}$")

    @model_validator(mode="after")
    def _secure(self) -> Hl7Target:
        if not self.tls and not loopback(self.host) and not self.allow_plaintext:
            raise ValueError(
                f"{self.host}: MLLP without TLS beyond loopback needs allow_plaintext: true"
            )
        return self


Target = Annotated[WebhookTarget | FhirTarget | Hl7Target, Field(discriminator="channel")]


class Targets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[Target] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _unique(cls, targets: list[Target]) -> list[Target]:
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique (delivery state uses them): {dupes}")
        return targets

    @classmethod
    def load(cls, path: Path) -> Targets:
        raw = yaml.safe_load(path.read_text()) or {}
        return cls.model_validate(raw)

    def for_alert(self, alert: Alert) -> list[Target]:
        """The targets this alert goes to, in file order."""
        return [t for t in self.targets if t.serves(alert, t.channel)]

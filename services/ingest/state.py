"""Ingest's keyed state: one :class:`SeriesState` per series, versioned.

The runtime keeps it in the compacted changelog ``ingest.state`` (JSON, sealed); a restart or a
new owner of the partition reads it back with :func:`load`. ``schema_version`` says how to read
a record:

* 1 (no ``schema_version`` field): the first layout, a dict with short keys and each instance
  as a positional list ``[digest, size, key id, instance number, position]``; upgraded on read;
* 2: the typed model without re-send tracking; upgraded on read (no content digests: such a
  series is compared by blob digest, see :class:`Fingerprint`);
* 3: without ``refused``; upgraded on read;
* 4: this model.

The life of a series' state (the timers are ingest's settings):

1. *assembling* (``revision == 0``): every accepted instance, until the end-of-series marker's
   count or ``inactivity_timeout_s`` of quiet completes revision 1;
2. *published* (``revision >= 1``, not ``compacted``): the instances of the last revision,
   kept ``retention_s`` after the last change, so that a late, changed or re-sent instance is
   compared one by one: a re-send of the same instances (same SOP Instance UIDs, same content
   digests) is a duplicate; an added or changed one makes revision n+1 with every instance;
3. *compacted*: only the :class:`Fingerprint` of the last revision (hash of its digest set
   and its count, ~200 bytes instead of ~250 bytes per instance), kept
   ``fingerprint_retention_s`` after the series was last seen, then deleted. A re-send is
   collected (``instances`` then holds just the re-send) and, once complete (its marker, or
   ``late_quiet_s`` of quiet), compared with the fingerprint as a whole: the same set is a
   duplicate, anything else is revision n+1 of what was re-sent.

A series that passes ingest's instance or byte cap is *refused*: its instances are dropped from
the state, it is never published, and every instance of it is dead-lettered
(``series_too_large``) until the state is deleted ``retention_s`` after the refusal.

A record of another version (written by a newer ingest, then rolled back) is refused (a
:class:`~shared.runtime.errors.PoisonError` with reason ``schema``) rather than guessed at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.dicom.safe import InstanceInfo
from shared.runtime.errors import PoisonError
from shared.schemas import Reason

VERSION = 4


def unreadable(message: str) -> PoisonError:
    """A changelog record this ingest cannot read (unknown version, or invalid)."""
    return PoisonError(Reason.SCHEMA, message)


class StoredInstance(BaseModel):
    """One accepted instance: where its bytes are and what orders it in the series."""

    # frozen: shared between state copies; NaN/Infinity written as json.dumps writes them (a
    # DS "NaN" position is accepted at ingest): pydantic's default, null, would not read back
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    digest: str = Field(description="blob digest (claim check)")
    size: int = Field(ge=0, description="bytes of the instance")
    key_id: str = Field(description="key that encrypts the blob")
    instance_number: int | None = Field(None, description="InstanceNumber, if given")
    position: tuple[float, float, float] | None = Field(
        None, description="ImagePositionPatient (mm), if given"
    )
    content: str | None = Field(
        None,
        description="SHA-256 of the dataset without its file meta (what re-sends are compared "
        "by); None in states from before version 3",
    )

    def same_content(self, other: StoredInstance) -> bool:
        """The same instance content: by content digest where both have one, else by blob."""
        if self.content is not None and other.content is not None:
            return self.content == other.content
        return self.digest == other.digest

    def compared_by(self, basis: Basis) -> str:
        return self.content if basis == "content" and self.content is not None else self.digest


Basis = Literal["content", "blob"]


class Fingerprint(BaseModel):
    """What is kept of a completed series after ``retention_s``: its digest set's hash and
    count. No UID in it (a hash), and a fixed size whatever the series' length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(description="SHA-256 over the sorted (SOP Instance UID, digest) pairs")
    count: int = Field(ge=0, description="instances in the revision")
    basis: Basis = Field("content", description="which digest of each instance went in")

    @classmethod
    def of(cls, instances: dict[str, StoredInstance], basis: Basis | None = None) -> Fingerprint:
        """The fingerprint of ``instances`` (by content digest when every one has one)."""
        if basis is None:
            basis = "content" if all(v.content for v in instances.values()) else "blob"
        return cls(sha256=_digest_set(instances.items(), basis), count=len(instances), basis=basis)


def _digest_set(items: Iterable[tuple[str, StoredInstance]], basis: Basis) -> str:
    h = hashlib.sha256()
    for sop, digest in sorted((sop, v.compared_by(basis)) for sop, v in items):
        h.update(f"{sop}\t{digest}\n".encode())
    return h.hexdigest()


class SeriesState(BaseModel):
    """A series being assembled, and after completion, what revisions need."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, ser_json_inf_nan="constants"
    )

    schema_version: Literal[4] = Field(4, description="layout of this record (VERSION)")
    study_instance_uid: str | None = Field(None, description="None until an instance came")
    series_instance_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_thickness_mm: float | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    acquired_at: str | None = Field(None, description="DICOM DA+TM of acquisition")
    instances: dict[str, StoredInstance] = Field(
        default_factory=dict,
        description="by SOP Instance UID: the series in assembly, the last revision (and late "
        "changes) while published, the re-send being collected once compacted",
    )
    expected_count: int | None = Field(None, description="from the end-of-series marker")
    revision: int = Field(0, ge=0, description="revisions published so far (0: in assembly)")
    dirty: bool = Field(False, description="added or changed instances since the last revision")
    resend: int = Field(
        0, ge=0, description="instances received since the last revision or duplicate verdict"
    )
    compacted: bool = Field(False, description="only the fingerprint of the last revision is kept")
    fingerprint: Fingerprint | None = Field(
        None, description="of the last revision, once compacted"
    )
    refused: bool = Field(
        False, description="past the series caps: never published, its instances refused"
    )
    first_received: float = Field(description="epoch s of the first message")
    last_update: float = Field(description="epoch s of the last change (timers)")
    last_published_at: datetime | None = Field(
        None, description="latest sent_at of the messages (end-to-end latency)"
    )

    @classmethod
    def new(cls, now: float, series_instance_uid: str | None = None) -> SeriesState:
        return cls(series_instance_uid=series_instance_uid, first_received=now, last_update=now)

    @property
    def geometry_missing(self) -> bool:
        return self.study_instance_uid is None or self.rows is None

    def take_geometry(self, info: InstanceInfo) -> None:
        """What the series is, from one of its instances (identity fields only if unset)."""
        self.study_instance_uid = self.study_instance_uid or info.study_instance_uid
        self.series_instance_uid = self.series_instance_uid or info.series_instance_uid
        self.modality = self.modality or info.modality
        self.body_part = info.body_part
        self.rows, self.columns = info.rows, info.columns
        self.pixel_spacing_mm = info.pixel_spacing
        self.slice_thickness_mm = info.slice_thickness
        self.orientation = info.orientation  # type: ignore[assignment]
        self.acquired_at = info.acquisition

    def published(self, sent_at: datetime) -> None:
        if self.last_published_at is None or sent_at > self.last_published_at:
            self.last_published_at = sent_at

    def dump(self) -> dict[str, Any]:
        """What the changelog stores (JSON types)."""
        return self.model_dump(mode="json")

    def encoded(self) -> bytes:
        """:meth:`dump` as JSON text, the same document (pydantic's serialiser: about 4x
        faster than ``json.dumps`` of the dump at 300 instances)."""
        return self.model_dump_json().encode()

    def clone(self) -> SeriesState:
        """An independent copy for the cost of one dict copy: every field but ``instances`` is
        immutable (str, numbers, tuples, datetime, the frozen :class:`Fingerprint`), and so is
        each :class:`StoredInstance`; the instance dict itself is copied."""
        return self.model_copy(update={"instances": dict(self.instances)})


def load(doc: Any) -> SeriesState:
    """A changelog value (parsed JSON) as the current model, upgrading older layouts."""
    if not isinstance(doc, dict):
        raise unreadable("series state is not an object")
    version = doc.get("schema_version", 1)
    try:
        if version == VERSION:
            return SeriesState.model_validate(doc)
        if version in (2, 3):
            return SeriesState.model_validate({**doc, "schema_version": VERSION})
        if version == 1:
            return _from_v1(doc)
    except (ValidationError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise unreadable(
            f"series state v{version} does not validate ({type(exc).__name__})"
        ) from None
    raise unreadable(f"series state of unknown version {version!r}")


def _from_v1(st: dict[str, Any]) -> SeriesState:
    """Version 1: short keys, instances as ``[digest, size, key_id, number, position]``."""
    last_pub = st.get("last_pub")
    return SeriesState(
        study_instance_uid=st.get("study"),
        series_instance_uid=st.get("series"),
        modality=st.get("modality"),
        body_part=st.get("body_part"),
        rows=st.get("rows"),
        columns=st.get("cols"),
        pixel_spacing_mm=tuple(st["spacing"]) if st.get("spacing") else None,
        slice_thickness_mm=st.get("thick"),
        orientation=tuple(st["orient"]) if st.get("orient") else None,
        acquired_at=st.get("acq"),
        instances={
            sop: StoredInstance(
                digest=v[0],
                size=v[1],
                key_id=v[2],
                instance_number=v[3],
                position=tuple(v[4]) if v[4] else None,
            )
            for sop, v in st["inst"].items()
        },
        expected_count=st.get("expected"),
        revision=st["revision"],
        dirty=bool(st.get("dirty")),
        first_received=st["first_rx"],
        last_update=st["last_update"],
        last_published_at=datetime.fromisoformat(last_pub) if last_pub else None,
    )

"""Wire format of every RadStream record.

* key: keyed hash (HMAC) of the series identity, never a UID in clear;
* value: AES-256-GCM envelope (see :mod:`shared.security.envelope`) around the record's JSON,
  sealed for the key purpose of its topic (:func:`shared.topology.purpose_of`): the writer
  needs only that purpose's public key, a reader its private key;
* headers: ``rs-schema`` and ``rs-version`` (no PHI), for routing and observability, and
  ``rs-min-reader`` when the writer's version is an additive change: the oldest reader version
  that can read the record (projecting it onto the fields it knows);
* associated data: topic, key, schema, version (and min-reader when sent), so a ciphertext
  replayed on another topic, under another key, as another schema or with its version
  declaration altered fails authentication. Records without ``rs-min-reader`` have exactly the
  associated data they always had.

A reader accepts the versions its model knows (older ones upgraded, see
:class:`shared.schemas.models.Record`); a newer one only if the writer declared the reader's
version able to read it; anything else is poison with reason ``schema``.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.runtime.errors import PoisonError
from shared.schemas.models import ReadContext
from shared.schemas.reasons import Reason
from shared.security.envelope import EnvelopeError, Keyring
from shared.topology import purpose_of

T = TypeVar("T")

Headers = list[tuple[str, bytes]]


MIN_READER = "rs-min-reader"


def aad(
    topic: str, key: bytes | None, schema: bytes, version: bytes, min_reader: bytes | None = None
) -> bytes:
    parts = [topic.encode(), key or b"", schema, version]
    if min_reader:
        parts.append(min_reader)
    return b"\x00".join(parts)


def _version_number(raw: bytes) -> int:
    """A version header: 1 to 6 ASCII digits (so it can never smuggle a separator)."""
    if not (raw.isdigit() and len(raw) <= 6):
        raise PoisonError(Reason.SCHEMA, "malformed version header")
    return int(raw)


def header(headers: Any, name: str) -> bytes:
    for k, v in headers or ():
        if k == name:
            return bytes(v)
    return b""


def describe_validation_error(exc: ValidationError) -> str:
    """A validation error as text that names fields and problems but never echoes input."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "<record>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Codec:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def encode(self, topic: str, key: bytes | None, record: BaseModel) -> tuple[bytes, Headers]:
        schema = str(getattr(record, "SCHEMA", type(record).__name__)).encode()
        number = int(getattr(record, "schema_version", 1))
        version = str(number).encode()
        headers = [("rs-schema", schema), ("rs-version", version)]
        oldest = getattr(type(record), "MIN_READER", None)
        min_reader = None
        if oldest is not None and oldest < number:  # additive: older readers can project it
            min_reader = str(oldest).encode()
            headers.append((MIN_READER, min_reader))
        plaintext = pack(record)
        value = self.keyring.seal(
            plaintext, aad(topic, key, schema, version, min_reader), purpose_of(topic)
        )
        return value, headers

    def decode(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        adapter: TypeAdapter[T],
    ) -> T:
        """Open and validate one record; every failure is a :class:`PoisonError` with a reason."""
        if not value:
            raise PoisonError(Reason.EMPTY, "record has no value")
        schema, version = header(headers, "rs-schema"), header(headers, "rs-version")
        if not schema or not version:
            raise PoisonError(Reason.MISSING_HEADER, "record lacks rs-schema / rs-version headers")
        min_reader = header(headers, MIN_READER) or None
        read = ReadContext(
            version=_version_number(version),
            min_reader=_version_number(min_reader or version),
        )
        try:
            plaintext = self.keyring.open(value, aad(topic, key, schema, version, min_reader))
        except EnvelopeError as exc:
            raise PoisonError(exc.reason, str(exc)) from None
        return unpack(plaintext, adapter, read)


def pack(record: BaseModel) -> bytes:
    """Plaintext of a record: its JSON, and its bulk bytes field (``ATTACHMENT``) appended raw
    rather than base64'd inside the JSON (a 512 KB payload stays 512 KB on the wire)."""
    field = getattr(record, "ATTACHMENT", None)
    if field is None:
        return b"J" + record.model_dump_json().encode()
    body = record.model_dump_json(exclude={field}).encode()
    attachment: bytes = getattr(record, field)
    return b"A" + struct.pack(">I", len(body)) + body + attachment


def unpack(plaintext: bytes, adapter: TypeAdapter[T], read: ReadContext | None = None) -> T:
    kind = plaintext[:1]
    if kind == b"J":
        return _validate(plaintext[1:], adapter, read)
    if kind == b"A" and len(plaintext) >= 5:
        (n,) = struct.unpack(">I", plaintext[1:5])
        if 5 + n > len(plaintext):
            raise PoisonError(Reason.SCHEMA, "record body length exceeds the record")
        record = _validate(plaintext[5 : 5 + n], adapter, read)
        field = getattr(record, "ATTACHMENT", None)
        if not isinstance(record, BaseModel) or field is None:
            raise PoisonError(Reason.SCHEMA, "attachment sent for a schema that has none")
        return record.model_copy(update={field: plaintext[5 + n :]})
    raise PoisonError(Reason.SCHEMA, "unknown record encoding")


def _validate(body: bytes, adapter: TypeAdapter[T], read: ReadContext | None) -> T:
    """Validate at the version the record declares; if that fails and the writer declared an
    additive change, try once more projecting it onto the reader's version (unknown fields
    ignored; the model decides whether its version may project, see ``Record._evolve``)."""
    try:
        return adapter.validate_json(body, context=read)
    except ValidationError as exc:
        if read is None or read.min_reader >= read.version:
            raise PoisonError(Reason.SCHEMA, describe_validation_error(exc)) from None
        first = describe_validation_error(exc)
    try:
        return adapter.validate_json(body, context=replace(read, project=True), extra="ignore")
    except ValidationError:
        raise PoisonError(Reason.SCHEMA, first) from None

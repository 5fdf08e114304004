"""Wire format of every RadStream record.

* key: keyed hash (HMAC) of the series identity, never a UID in clear;
* value: AES-256-GCM envelope (see :mod:`shared.security.envelope`) around the record's JSON;
* headers: ``rs-schema`` and ``rs-version`` (no PHI), for routing and observability;
* associated data: topic, key, schema and version, so a ciphertext replayed on another topic,
  under another key or as another schema fails authentication.
"""

from __future__ import annotations

import struct
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.runtime.errors import PoisonError
from shared.schemas.reasons import Reason
from shared.security.envelope import EnvelopeError, Keyring

T = TypeVar("T")

Headers = list[tuple[str, bytes]]


def aad(topic: str, key: bytes | None, schema: bytes, version: bytes) -> bytes:
    return b"\x00".join((topic.encode(), key or b"", schema, version))


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
        version = str(getattr(record, "schema_version", 1)).encode()
        value = self.keyring.seal(pack(record), aad(topic, key, schema, version))
        return value, [("rs-schema", schema), ("rs-version", version)]

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
        try:
            plaintext = self.keyring.open(value, aad(topic, key, schema, version))
        except EnvelopeError as exc:
            raise PoisonError(exc.reason, str(exc)) from None
        return unpack(plaintext, adapter)


def pack(record: BaseModel) -> bytes:
    """Plaintext of a record: its JSON, and its bulk bytes field (``ATTACHMENT``) appended raw
    rather than base64'd inside the JSON (a 512 KB payload stays 512 KB on the wire)."""
    field = getattr(record, "ATTACHMENT", None)
    if field is None:
        return b"J" + record.model_dump_json().encode()
    body = record.model_dump_json(exclude={field}).encode()
    attachment: bytes = getattr(record, field)
    return b"A" + struct.pack(">I", len(body)) + body + attachment


def unpack(plaintext: bytes, adapter: TypeAdapter[T]) -> T:
    kind = plaintext[:1]
    try:
        if kind == b"J":
            return adapter.validate_json(plaintext[1:])
        if kind == b"A" and len(plaintext) >= 5:
            (n,) = struct.unpack(">I", plaintext[1:5])
            if 5 + n > len(plaintext):
                raise PoisonError(Reason.SCHEMA, "record body length exceeds the record")
            record = adapter.validate_json(plaintext[5 : 5 + n])
            field = getattr(record, "ATTACHMENT", None)
            if not isinstance(record, BaseModel) or field is None:
                raise PoisonError(Reason.SCHEMA, "attachment sent for a schema that has none")
            return record.model_copy(update={field: plaintext[5 + n :]})
    except ValidationError as exc:
        raise PoisonError(Reason.SCHEMA, describe_validation_error(exc)) from None
    raise PoisonError(Reason.SCHEMA, "unknown record encoding")

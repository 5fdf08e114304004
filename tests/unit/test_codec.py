from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError
from shared.schemas import DeadLetter, EndOfSeries, InstanceData, Probe
from shared.security.envelope import Keyring

TOPIC = "radstream.series"


def test_round_trip_with_raw_attachment() -> None:
    codec = Codec(Keyring.generate())
    probe = Probe(id="a", seq=1, payload=b"\x00\xff" * 1000)
    value, headers = codec.encode(TOPIC, b"k", probe)
    assert dict(headers) == {"rs-schema": b"radstream.probe", "rs-version": b"1"}
    # attachment carried raw: the envelope is not inflated by base64
    assert len(value) < 2000 + 200
    assert codec.decode(TOPIC, b"k", value, headers, TypeAdapter(Probe)) == probe


def test_union_topic_models() -> None:
    codec = Codec(Keyring.generate())
    adapter: TypeAdapter[InstanceData | EndOfSeries] = TypeAdapter(InstanceData | EndOfSeries)
    for record in (
        InstanceData(source="ct1", data=b"DICM..."),
        EndOfSeries(source="ct1", series_instance_uid="1.2.3", expected_count=3),
    ):
        value, headers = codec.encode("radstream.instances", b"k", record)
        assert codec.decode("radstream.instances", b"k", value, headers, adapter) == record


def _sealed_json(
    codec: Codec, body: bytes, schema: bytes = b"radstream.probe"
) -> tuple[bytes, list[tuple[str, bytes]]]:
    from shared.runtime.codec import aad
    from shared.topology import purpose_of

    return codec.keyring.seal(b"J" + body, aad(TOPIC, b"k", schema, b"1"), purpose_of(TOPIC)), [
        ("rs-schema", schema),
        ("rs-version", b"1"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        b'{"schema_version":1,"id":"a","seq":1,"payload":"","surprise":"Doe^John"}',  # unknown field
        b'{"schema_version":1,"id":"a","seq":"Doe^John","payload":""}',  # wrong type
        b'{"schema_version":2,"id":"a","seq":1,"payload":""}',  # unknown version
        b"not json Doe^John",
    ],
)
def test_invalid_records_are_poison_without_echoing_input(body: bytes) -> None:
    codec = Codec(Keyring.generate())
    value, headers = _sealed_json(codec, body)
    with pytest.raises(PoisonError) as info:
        codec.decode(TOPIC, b"k", value, headers, TypeAdapter(Probe))
    assert info.value.reason == "schema"
    assert "Doe" not in info.value.message


def test_dead_letter_reason_codes_are_bounded() -> None:
    with pytest.raises(ValueError):
        DeadLetter(
            stage="x",
            reason="Free text!",
            message="m",
            source_topic="t",
            source_partition=0,
            source_offset=0,
            attempts=1,
        )

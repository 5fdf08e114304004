from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.schemas import EndOfSeries, Probe, SeriesReady


def test_unknown_fields_and_wrong_types_are_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        Probe.model_validate({"id": "a", "seq": 1, "extra": True})
    with pytest.raises(ValidationError):
        Probe.model_validate({"id": "a", "seq": "1"})  # strict: no str → int coercion


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/4", "1.2.a", "", "1." * 40])
def test_uids_are_validated(uid: str) -> None:
    with pytest.raises(ValidationError):
        EndOfSeries(source="ct", series_instance_uid=uid, expected_count=1)


def test_every_model_documents_its_fields() -> None:
    schema = SeriesReady.model_json_schema()
    assert schema["properties"]["revision"]["description"]
    assert Probe.SCHEMA == "radstream.probe"

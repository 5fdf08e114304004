from __future__ import annotations

import pytest

from shared.config import Settings


def test_settings_from_environment_keep_secrets_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADSTREAM_KAFKA__USERNAME", "ingest")
    monkeypatch.setenv("RADSTREAM_KAFKA__PASSWORD", "hunter2")
    monkeypatch.setenv("RADSTREAM_TOPIC_PREFIX", "site1.")
    s = Settings()
    assert s.kafka.username == "ingest"
    assert s.kafka.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in s.model_dump_json()
    assert s.topic("series") == "site1.series"


def test_settings_are_frozen_and_strict(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    with pytest.raises(ValueError):
        s.topic_prefix = "x"  # type: ignore[misc]
    monkeypatch.setenv("RADSTREAM_BATCH_MAX_RECORDS", "lots")
    with pytest.raises(ValueError):
        Settings()

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.config import PreprocessSettings, Settings, usable_cpus


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


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_decode_threads_follow_the_cpus_the_container_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    # no cgroup files (or unreadable ones): the affinity mask
    assert usable_cpus(tmp_path / "none") == 16
    # cgroup v2: a 2.5-CPU limit rounds up to 3; "max" is no limit
    assert usable_cpus(_cgroup(tmp_path / "v2", {"cpu.max": "250000 100000\n"})) == 3
    assert usable_cpus(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) == 16
    # cgroup v1: quota / period; -1 is no limit
    v1 = {"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cpus(_cgroup(tmp_path / "v1", v1)) == 4
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert usable_cpus(_cgroup(tmp_path / "v1max", unlimited)) == 16
    # a limit below one CPU still leaves one thread; garbage is ignored
    assert usable_cpus(_cgroup(tmp_path / "small", {"cpu.max": "20000 100000"})) == 1
    assert usable_cpus(_cgroup(tmp_path / "bad", {"cpu.max": "lots 0"})) == 16
    # cgroup v2 without a cgroup namespace: the process's own cgroup and those above it
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod1/c1\n")
    nested = {
        "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "300000 100000",
        "kubepods/pod1/c1/cpu.max": "max 100000",
    }
    assert usable_cpus(_cgroup(tmp_path / "nested", nested), proc) == 3
    parent = {"kubepods/cpu.max": "200000 100000", "kubepods/pod1/c1/cpu.max": "max 100000"}
    assert usable_cpus(_cgroup(tmp_path / "parent", parent), proc) == 2
    # preprocess's default: those CPUs, at most 8; an explicit setting wins, 0 is refused
    monkeypatch.setattr("shared.config.CGROUP_ROOT", tmp_path / "none")
    assert PreprocessSettings().threads == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert PreprocessSettings().threads == 3
    monkeypatch.setenv("RADSTREAM_PREPROCESS__THREADS", "5")
    assert Settings().preprocess.threads == 5
    with pytest.raises(ValueError):
        PreprocessSettings(threads=0)

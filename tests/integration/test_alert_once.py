"""The alert stage never publishes an alert id twice, against the real broker with the stage as
real processes: SIGKILLs mid-stream, a rebalance onto a second instance, and every finding
replayed (the same revisions again) afterwards."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.schemas import Alert, AuditEvent, Finding, SegmentationDone
from tests.helpers import Env, Reader, StageProcess, group_caught_up, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERIES = 300  # two alerting findings each (critical haemorrhage, large nodule)


def findings(env: Env, series: range) -> list[tuple[bytes, SegmentationDone]]:
    now = datetime.now(UTC)
    out = []
    for i in series:
        uid = f"1.2.826.0.1.3680043.10.{i}"
        out.append(
            (
                env.keyring.keyed_hash(uid),
                SegmentationDone(
                    study_instance_uid=f"1.2.826.0.1.3680043.11.{i}",
                    series_instance_uid=uid,
                    revision=1,
                    modality="CT",
                    task="head_ct",
                    findings=[
                        Finding(type="haemorrhage", label=f"bleed-{i}", volume_ml=2.0),
                        Finding(type="nodule", label=f"nodule-{i}", diameter_mm=9.0),
                    ],
                    algorithm="test",
                    algorithm_version="1",
                    source_offset=i,
                    source_partition=0,
                    last_published_at=now,
                ),
            )
        )
    return out


def alert_stage(env: Env, tmp: Path, name: str) -> StageProcess:
    return StageProcess(
        env.service_env("alert", RADSTREAM_SESSION_TIMEOUT_S="6", RADSTREAM_BATCH_MAX_RECORDS="5"),
        "services.alert.main",
        tmp / f"{name}.log",
    ).start()


async def test_alert_ids_once_under_sigkill_rebalance_and_replay(env: Env, tmp_path: Path) -> None:
    rng = random.Random(20261126)
    batch = findings(env, range(SERIES))
    await env.produce("findings", batch)
    procs: list[StageProcess] = []
    async with Reader(env, "alerts", Alert) as feed:

        async def reach(count: int) -> None:
            async def enough() -> bool:
                await feed.poll()
                return len({a.alert_id for a in feed.records}) >= count

            await wait_until(enough, 180, f"{count} distinct alerts")

        async def caught_up() -> bool:
            return await group_caught_up(env, "alert", "findings")

        # SIGKILL a lone instance at a random point of the first pass
        first = alert_stage(env, tmp_path, "first")
        procs.append(first)
        await reach(rng.randrange(60, 2 * SERIES // 2))
        first.kill()
        # two instances: the group rebalances; every finding is replayed meanwhile
        a = alert_stage(env, tmp_path, "a")
        await reach(2 * SERIES * 2 // 3)
        b = alert_stage(env, tmp_path, "b")
        procs += [a, b]
        await env.produce("findings", batch)  # the same findings again (same revisions)
        await wait_until(caught_up, 180, "the alert group to commit every finding")
        a.kill()  # the survivor owns every partition now, its state restored
        await env.produce("findings", batch[: SERIES // 3])  # and once more, to the survivor
        await wait_until(caught_up, 180, "the survivor to commit every finding")
        await feed.drain(2.0)
        assert b.terminate() == 0

    ids = Counter(a.alert_id for a in feed.records)
    assert len(ids) == 2 * SERIES, "every alerting finding raised once"
    dup = {aid: n for aid, n in ids.items() if n > 1}
    assert not dup, f"{len(dup)} alert ids published more than once"
    # the replays were seen and audited as duplicates (no UID in the audit record)
    async with Reader(env, "audit.in.alert", AuditEvent) as audit:
        await audit.drain(1.0)
    suppressed = [e for e in audit.records if e.action == "alert_duplicate"]
    assert len({e.resource for e in suppressed}) == SERIES
    assert all("1.2.826" not in e.model_dump_json() for e in suppressed)
    assert sum(1 for p in procs if p.proc is not None and p.proc.returncode == -9) == 2

"""The whole pipeline, every service a real process, the real broker and a real Orthanc:
phantoms with lesions yield exactly the expected alerts, the normal study none, each SEG is
in the PACS exactly once; killing a service mid-run changes nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.schemas import Alert, SegmentationDone, VolumePrepared
from tests.helpers import REPO, Env, Orthanc, Reader, StageProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = ("ingest", "preprocess", "segmentation", "alert")


async def test_pipeline_end_to_end_with_orthanc_and_a_kill(env: Env, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {"RADSTREAM": "RADSTREAM"}).start()
    extra = {
        "RADSTREAM_DEVICE": "cpu",
        "RADSTREAM_SESSION_TIMEOUT_S": "6",
        "RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S": "600",
        "RADSTREAM_ALERT__PACS_HOST": "127.0.0.1",
        "RADSTREAM_ALERT__PACS_PORT": str(pacs.dicom_port),
    }
    procs = {
        name: StageProcess(
            env.service_env(name, **extra), f"services.{name}.main", tmp_path / f"{name}.log"
        ).start()
        for name in SERVICES
    }
    try:
        chest = phantom.chest_ct(
            tmp_path / "chest", seed=61, size=256, slices=48, nodules_mm=(10.0, 7.0)
        )
        head = phantom.head_ct(tmp_path / "head", seed=62, size=256, slices=36, bleed_ml=5.0)
        normal = phantom.chest_ct(tmp_path / "normal", seed=63, size=256, slices=40, nodules_mm=())
        async with Publisher(
            env.broker.settings_for("scanner"),
            env.keyring,
            source="e2e",
            topic=env.topic("instances"),
        ) as pub:
            for ph in (chest, head, normal):
                for f in ph.files:
                    await pub.publish(f.read_bytes())
                await pub.end_series(ph.series_instance_uid, len(ph.files))

        async with Reader(env, "volumes", VolumePrepared) as vols:
            await vols.wait_for(1, timeout=120)
        # SIGKILL a stage mid-run, then bring it back
        procs["segmentation"].kill()
        procs["segmentation"] = StageProcess(
            env.service_env("segmentation", **extra),
            "services.segmentation.main",
            tmp_path / "segmentation-2.log",
        ).start()

        async with (
            Reader(env, "findings", SegmentationDone) as done,
            Reader(env, "alerts", Alert) as feed,
        ):
            await done.wait_for(3, timeout=240)
            await feed.wait_for(3, timeout=120)
            await feed.drain(3.0)
            await done.drain(1.0)

        assert sorted(d.series_instance_uid for d in done.records) == sorted(
            p.series_instance_uid for p in (chest, head, normal)
        ), "one result per series, despite the kill"
        got = sorted((a.series_instance_uid, a.finding, a.severity) for a in feed.records)
        assert got == sorted(
            [
                (chest.series_instance_uid, "nodule", "high"),
                (chest.series_instance_uid, "nodule", "medium"),
                (head.series_instance_uid, "haemorrhage", "critical"),
            ]
        )
        assert len({a.alert_id for a in feed.records}) == 3
        assert all(a.latency_seconds < 120 and a.seg_sop_instance_uid for a in feed.records)

        # each SEG is in the PACS, exactly once
        seg_uids = sorted(d.seg_sop_instance_uid for d in done.records if d.seg_sop_instance_uid)
        assert len(seg_uids) == 3

        def in_pacs() -> list[str]:
            return sorted(
                i["SOPInstanceUID"] for i in pacs.instances() if i and i.get("Modality") == "SEG"
            )

        async def delivered() -> bool:
            return in_pacs() == seg_uids

        await wait_until(delivered, 60, "SEGs in Orthanc")
        assert len(pacs.get("/instances")) == 3

        # the alert consumer's view
        cli = await asyncio.create_subprocess_exec(
            str(REPO / ".venv" / "bin" / "radstream"),
            "alerts",
            "--json",
            env=env.service_env("alert-consumer"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, stderr.decode()
        rows = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
        assert len(rows) == 3
        for row in rows:
            assert {
                "alert_id",
                "severity",
                "finding",
                "series_instance_uid",
                "study_instance_uid",
                "measurements",
                "latency_seconds",
                "created_at",
            } <= row.keys()
    finally:
        for proc in procs.values():
            if proc.alive():
                proc.terminate(15)
        pacs.stop()

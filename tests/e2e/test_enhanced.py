"""Enhanced multi-frame CT through the whole pipeline (every service a real process, the real
broker, a real Orthanc as the PACS): a chest phantom sent as its single-frame series and as its
Enhanced CT twin (one instance, frames shuffled, geometry in functional groups, no end-of-series
marker) gives the same findings and the same alerts; each gets a SEG and an SR that the PACS
stores, the twin's SEG over the twin's frames."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.schemas import Alert, ResultsReady, SegmentationDone, SeriesReady
from shared.storage import BlobStore, LocalDirBackend
from shared.topology import STAGE_NAMES
from tests.enhanced import assert_same_findings, from_series
from tests.helpers import Env, Orthanc, Reader, StageProcess, dciodvfy_errors, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_enhanced_ct_twin_gives_the_same_findings_alerts_and_a_seg_on_its_frames(
    env: Env, tmp_path: Path
) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {"RADSTREAM": "RADSTREAM"}).start()
    extra = {
        "RADSTREAM_DEVICE": "cpu",
        "RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S": "600",  # only a marker or the instance itself
        "RADSTREAM_RESULTS__PACS_HOST": "127.0.0.1",
        "RADSTREAM_RESULTS__PACS_PORT": str(pacs.dicom_port),
    }
    procs = {
        name: StageProcess(
            env.service_env(name, **extra), f"services.{name}.main", tmp_path / f"{name}.log"
        ).start()
        for name in STAGE_NAMES
    }
    try:
        chest = phantom.chest_ct(
            tmp_path / "chest", seed=9, size=128, slices=24, nodules_mm=(10.0, 7.0)
        )
        order = [int(i) for i in np.random.default_rng(7).permutation(len(chest.files))]
        twin = from_series(chest.files, frame_order=order)
        twin_uid = str(pydicom.dcmread(io.BytesIO(twin), stop_before_pixels=True).SeriesInstanceUID)
        async with Publisher(
            env.broker.settings_for("scanner"),
            env.keyring,
            source="e2e",
            topic=env.topic("instances"),
        ) as pub:
            await pub.publish(twin)  # one instance, no marker: it is the whole series
            for f in chest.files:
                await pub.publish(f.read_bytes())
            await pub.end_series(chest.series_instance_uid, len(chest.files))

        async with (
            Reader(env, "series", SeriesReady) as ready,
            Reader(env, "findings", SegmentationDone) as done,
            Reader(env, "alerts", Alert) as feed,
            Reader(env, "results", ResultsReady) as papers,
        ):
            await ready.wait_for(2, timeout=120)
            await done.wait_for(2, timeout=240)
            await papers.wait_for(2, timeout=240)
            await feed.drain(2.0)
            await ready.drain(1.0)
            await done.drain(1.0)

        completed = {r.series_instance_uid: r.completed_by for r in ready.records}
        assert completed == {twin_uid: "instance", chest.series_instance_uid: "marker"}
        by_series = {d.series_instance_uid: d for d in done.records}
        single, multi = by_series[chest.series_instance_uid], by_series[twin_uid]
        assert len(single.source_instances) == 24
        assert_same_findings(single, multi)
        assert sum(f.type == "nodule" for f in multi.findings) == 2

        alerts: dict[str, list[tuple[str, str, str]]] = {s: [] for s in by_series}
        for al in feed.records:
            alerts[al.series_instance_uid].append((al.finding, al.finding_label, al.severity))
        assert alerts[twin_uid] and sorted(alerts[twin_uid]) == sorted(
            alerts[chest.series_instance_uid]
        )

        papers_by = {p.series_instance_uid: p for p in papers.records}
        pm, ps = papers_by[twin_uid], papers_by[chest.series_instance_uid]
        assert pm.not_built is None and pm.seg is not None and pm.sr is not None
        assert pm.seg_frames == ps.seg_frames and pm.delivery == ps.delivery == "delivered"
        store = BlobStore(LocalDirBackend(env.settings("results").blob_path), env.keyring)
        assert dciodvfy_errors(store.get(pm.seg), tmp_path / "seg.dcm") == []
        assert dciodvfy_errors(store.get(pm.sr), tmp_path / "sr.dcm") == []
        seg = hd.seg.segread(io.BytesIO(store.get(pm.seg)))
        source_uid = multi.source_instances[0].sop_instance_uid
        refs = {
            (
                f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
                int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber),
            )
            for f in seg.PerFrameFunctionalGroupsSequence
        }
        assert {uid for uid, _ in refs} == {source_uid}
        assert {n for _, n in refs} <= set(range(1, 25))
        uids = sorted(
            u
            for p in (pm, ps)
            for u in (p.seg_sop_instance_uid, p.sr_sop_instance_uid)
            if u is not None
        )

        async def in_pacs() -> bool:
            got = [
                i["SOPInstanceUID"]
                for i in pacs.instances()
                if i and i.get("Modality") in ("SEG", "SR")
            ]
            return sorted(got) == uids

        await wait_until(in_pacs, 60, "both series' SEG and SR in Orthanc")
    finally:
        for proc in procs.values():
            if proc.alive():
                proc.terminate()
        pacs.stop()

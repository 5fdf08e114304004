"""The results service against the real broker and a real Orthanc: SEG and SR reach the PACS
exactly once although the service is SIGKILLed in the middle of a delivery, one results record
per series revision is committed, deliveries are audited, and nothing of the patient is in
the service's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.preprocess.core import PreprocessCore
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.runtime.stage import Context
from shared.schemas import AuditEvent, ResultsReady, SegmentationDone
from shared.stack.broker import free_port
from shared.storage import BlobStore, LocalDirBackend
from tests.helpers import Env, Orthanc, Reader, StageProcess, wait_until
from tests.pipeline import files, series_ready

pytestmark = pytest.mark.integration


def findings(env: Env, phantoms: list[phantom.Phantom]) -> list[SegmentationDone]:
    """What segmentation publishes for these phantoms (its own core, offline)."""
    store = BlobStore(LocalDirBackend(env.settings("results").blob_path), env.keyring)
    pre = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
    seg = SegmentationCore(store, select_backend("cpu"))
    ctx = Context("offline", 0, 0, b"k", 0, None, env.keyring)
    return [
        seg.handle(pre.handle(series_ready(files(ph.files), store, env.keyring), ctx), ctx)
        for ph in phantoms
    ]


DICOMWEB = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
async def test_seg_and_sr_reach_orthanc_once_across_a_sigkill_mid_delivery(
    env: Env, tmp_path: Path, protocol: str
) -> None:
    """By C-STORE, and by DICOMweb (QIDO-RS, then STOW-RS) to Orthanc's DICOMweb server
    (Debian's orthanc-dicomweb): the service is SIGKILLed while the SEG's store is in flight."""
    head = phantom.head_ct(tmp_path / "head", seed=71, size=160, slices=28, bleed_ml=6.0)
    (done,) = findings(env, [head])
    assert done.seg is None and any(f.type == "haemorrhage" for f in done.findings)
    await env.produce("findings", [(env.keyring.keyed_hash(done.series_instance_uid), done)])
    if protocol == "dimse":
        pacs = Orthanc(tmp_path / "orthanc", {"RADSTREAM": "RADSTREAM"}).start()
        to_pacs = {
            "RADSTREAM_RESULTS__PACS_HOST": "127.0.0.1",
            "RADSTREAM_RESULTS__PACS_PORT": str(pacs.dicom_port),
        }
    else:
        pacs = Orthanc(tmp_path / "orthanc", {}, DICOMWEB).start()
        to_pacs = {
            "RADSTREAM_RESULTS__PACS_PROTOCOL": "dicomweb",
            "RADSTREAM_RESULTS__DICOMWEB_URL": f"http://127.0.0.1:{pacs.http_port}/dicom-web",
            "RADSTREAM_RESULTS__PACS_TIMEOUT_S": "90",  # the held STOW-RS waits in Orthanc
        }
    service = env.service_env("results", RADSTREAM_SESSION_TIMEOUT_S="6", **to_pacs)
    first = second = None
    try:
        pacs.hold()  # the first store that arrives waits in Orthanc...
        first = StageProcess(service, "services.results.main", tmp_path / "r1.log").start()

        async def storing() -> bool:
            return len(pacs.received()) == 1

        await wait_until(storing, 180, "the SEG's store to arrive")
        first.kill()  # ...and the service dies in the middle of delivering it
        assert not first.alive()
        (seg_uid,) = pacs.received()
        pacs.release()  # Orthanc finishes the store the dead peer sent

        async def stored() -> bool:
            return len(pacs.get("/instances") or []) == 1

        await wait_until(stored, 30, "Orthanc to store the SEG")
        second = StageProcess(service, "services.results.main", tmp_path / "r2.log").start()
        async with (
            Reader(env, "results", ResultsReady) as out,
            Reader(env, "audit.in.results", AuditEvent) as audit,
        ):
            (record,) = await out.wait_for(1, timeout=180)
            await audit.wait_for(2, timeout=30)
            await out.drain(2.0)
            await audit.drain(1.0)
        assert second.terminate() == 0
        stored_objects = sorted(
            (i["Modality"], i["SOPInstanceUID"]) for i in pacs.instances() if i is not None
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.alive():
                proc.kill()
        pacs.stop()

    assert len(out.records) == 1, "one results record for the revision, despite the kill"
    assert (record.series_instance_uid, record.revision) == (done.series_instance_uid, 1)
    assert record.seg_sop_instance_uid == seg_uid and record.sr_sop_instance_uid
    # each object received by the PACS exactly once: the redo found the SEG there already
    assert pacs.received() == [seg_uid, record.sr_sop_instance_uid]
    assert [(d.object, d.outcome) for d in record.deliveries] == [
        ("SEG", "already_present"),
        ("SR", "delivered"),
    ]
    assert record.delivery == "delivered"
    assert stored_objects == sorted([("SEG", seg_uid), ("SR", record.sr_sop_instance_uid)])
    # delivery is audited (committed with the record), by keyed hash, never a UID
    actions = sorted(a.action for a in audit.records if a.actor == "results")
    assert actions == ["pacs_already_present", "pacs_delivered"]
    assert all(seg_uid not in a.resource for a in audit.records)
    for log in ("r1.log", "r2.log"):
        text = (tmp_path / log).read_text()
        assert head.series_instance_uid not in text and head.study_instance_uid not in text
        assert seg_uid not in text and "PHANTOM" not in text


async def test_a_pacs_that_is_down_leaves_a_failed_delivery_not_a_lost_result(
    env: Env, tmp_path: Path
) -> None:
    head = phantom.head_ct(tmp_path / "head", seed=72, size=128, slices=20, bleed_ml=4.0)
    (done,) = findings(env, [head])
    await env.produce("findings", [(env.keyring.keyed_hash(done.series_instance_uid), done)])
    proc = StageProcess(
        env.service_env(
            "results",
            RADSTREAM_RETRY_ATTEMPTS="2",
            RADSTREAM_RETRY_BACKOFF_S="0.1",
            RADSTREAM_RESULTS__PACS_HOST="127.0.0.1",
            RADSTREAM_RESULTS__PACS_PORT=str(free_port()),  # nobody listens
            RADSTREAM_RESULTS__PACS_TIMEOUT_S="2",
        ),
        "services.results.main",
        tmp_path / "r.log",
    ).start()
    try:
        async with Reader(env, "results", ResultsReady) as out:
            (record,) = await out.wait_for(1, timeout=180)
    finally:
        assert proc.terminate() == 0
    assert record.delivery == "failed" and record.seg is not None and record.sr is not None
    assert {d.outcome for d in record.deliveries} == {"failed"}

"""The results service delivering by DICOMweb (QIDO-RS, then STOW-RS) to Orthanc's DICOMweb
server (Debian's orthanc-dicomweb), against the real broker: the SEG and SR reach the PACS
exactly once although the service is SIGKILLed while its STOW-RS of the SEG is in flight."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.dicom import phantom
from shared.schemas import ResultsReady
from tests.helpers import Env, Orthanc, Reader, StageProcess, wait_until
from tests.integration.test_results import findings

pytestmark = pytest.mark.integration

DICOMWEB = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


async def test_seg_and_sr_reach_orthanc_dicomweb_once_across_a_sigkill_mid_stow(
    env: Env, tmp_path: Path
) -> None:
    head = phantom.head_ct(tmp_path / "head", seed=73, size=128, slices=20, bleed_ml=5.0)
    (done,) = findings(env, [head])
    assert any(f.type == "haemorrhage" for f in done.findings)
    await env.produce("findings", [(env.keyring.keyed_hash(done.series_instance_uid), done)])
    pacs = Orthanc(tmp_path / "orthanc", {}, DICOMWEB).start()
    service = env.service_env(
        "results",
        RADSTREAM_SESSION_TIMEOUT_S="6",
        RADSTREAM_RESULTS__PACS_PROTOCOL="dicomweb",
        RADSTREAM_RESULTS__DICOMWEB_URL=f"http://127.0.0.1:{pacs.http_port}/dicom-web",
        RADSTREAM_RESULTS__PACS_TIMEOUT_S="90",
    )
    first = second = None
    try:
        pacs.hold()  # the first STOW-RS that arrives waits in Orthanc...
        first = StageProcess(service, "services.results.main", tmp_path / "r1.log").start()

        async def storing() -> bool:
            return len(pacs.received()) == 1

        await wait_until(storing, 180, "the SEG's STOW-RS to arrive")
        first.kill()  # ...and the service dies in the middle of delivering it
        (seg_uid,) = pacs.received()
        pacs.release()

        async def stored() -> bool:
            return len(pacs.get("/instances") or []) == 1

        await wait_until(stored, 30, "Orthanc to store the SEG")
        second = StageProcess(service, "services.results.main", tmp_path / "r2.log").start()
        async with Reader(env, "results", ResultsReady) as out:
            (record,) = await out.wait_for(1, timeout=180)
            await out.drain(2.0)
        assert second.terminate() == 0
        stored_objects = sorted(
            (i["Modality"], i["SOPInstanceUID"]) for i in pacs.instances() if i is not None
        )
    finally:
        for proc in (first, second):
            if proc is not None and proc.alive():
                proc.kill()
        pacs.stop()

    assert len(out.records) == 1
    assert record.seg_sop_instance_uid == seg_uid and record.sr_sop_instance_uid
    # each object reached the PACS exactly once: the redo found the SEG there by QIDO-RS
    assert pacs.received() == [seg_uid, record.sr_sop_instance_uid]
    assert [(d.object, d.outcome) for d in record.deliveries] == [
        ("SEG", "already_present"),
        ("SR", "delivered"),
    ]
    assert record.delivery == "delivered"
    assert stored_objects == sorted([("SEG", seg_uid), ("SR", record.sr_sop_instance_uid)])
    for log in ("r1.log", "r2.log"):
        text = (tmp_path / log).read_text()
        assert head.series_instance_uid not in text and seg_uid not in text

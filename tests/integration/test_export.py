"""``radstream export SERIES --deidentify`` against the real broker and blob store, as the
exporter principal: the series' instances and its SEG come out de-identified, referencing each
other, nothing of the patient left; an export without --deidentify is refused; the export is
on the exporter's audit intake."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from shared.dicom.phantom import head_ct
from shared.dicom.seg import Algorithm, build_seg
from shared.schemas import AuditEvent, InstanceRef, ResultsReady, SegmentationDone
from shared.storage import BlobStore, LocalDirBackend
from shared.topology import FINDINGS, INSTANCES
from tests.helpers import Env, Reader
from tests.integration.test_cli import run_cli

pytestmark = pytest.mark.integration


async def test_export_deidentifies_the_series_and_its_seg(env: Env, tmp_path: Path) -> None:
    ph = head_ct(tmp_path / "ph", size=64, slices=6, bleed_ml=2.0)
    datasets = [pydicom.dcmread(p) for p in ph.files]
    for ds in datasets:
        ds.PatientName, ds.PatientID, ds.OperatorsName = "DOE^JANE", "MRN-4455667", "TECH^TOM"
    raw = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        raw.append(buf.getvalue())
    store = BlobStore(LocalDirBackend(env.settings("results").blob_path), env.keyring)
    refs = [
        InstanceRef(blob=store.put(data, INSTANCES), sop_instance_uid=str(ds.SOPInstanceUID))
        for data, ds in zip(raw, datasets, strict=True)
    ]
    seg = build_seg(
        datasets,
        {"haemorrhage": ph.truth["haemorrhage"]},
        series_instance_uid=ph.series_instance_uid,
        revision=1,
        algorithm=Algorithm("radstream-test", "1.0"),
    )
    common = {
        "study_instance_uid": ph.study_instance_uid,
        "series_instance_uid": ph.series_instance_uid,
        "revision": 1,
        "modality": "CT",
        "task": "head_ct",
        "algorithm": "radstream-test",
        "algorithm_version": "1.0",
        "source_partition": 0,
        "source_offset": 0,
    }
    done = SegmentationDone(**common, source_instances=refs, last_published_at=datetime.now(UTC))
    results = ResultsReady(**common, seg=store.put(seg, FINDINGS), delivery="not_configured")
    key = env.keyring.keyed_hash(ph.series_instance_uid)
    await env.produce("findings", [(key, done)])
    await env.produce("results", [(key, results)])

    cli_env = env.service_env("exporter")
    out = tmp_path / "export"
    refused = run_cli(["export", ph.series_instance_uid, "--out", str(out)], cli_env)
    assert refused.returncode == 2 and not out.exists()
    ok = run_cli(["export", ph.series_instance_uid, "--out", str(out), "--deidentify"], cli_env)
    assert ok.returncode == 0, ok.stderr
    images = [pydicom.dcmread(p) for p in sorted((out / "series").glob("*.dcm"))]
    exported_seg = pydicom.dcmread(out / "seg.dcm")
    assert len(images) == len(datasets)
    originals = {str(e.value) for ds in datasets for e in ds.iterall() if e.VR == "UI"}
    for ds in [*images, exported_seg]:
        text = str(ds) + str(ds.file_meta)
        for phi in ("DOE", "JANE", "4455667", "TECH", ph.study_instance_uid):
            assert phi not in text
        assert ds.StudyInstanceUID not in originals and ds.PatientIdentityRemoved == "YES"
    (ref,) = exported_seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == images[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} <= {
        ds.SOPInstanceUID for ds in images
    }
    assert len({str(ds.PatientID) for ds in [*images, exported_seg]}) == 1
    # the same project key again: the same pseudonym and UIDs
    again = tmp_path / "again"
    assert (
        run_cli(
            ["export", ph.series_instance_uid, "--out", str(again), "--deidentify"], cli_env
        ).returncode
        == 0
    )
    assert pydicom.dcmread(again / "seg.dcm").SOPInstanceUID == exported_seg.SOPInstanceUID
    # the operator's `radstream results` reads the same records (and is audited as a read)
    papers = tmp_path / "papers"
    shown = run_cli(
        ["results", ph.series_instance_uid, "--out", str(papers)], env.service_env("operator")
    )
    assert shown.returncode == 0, shown.stderr
    assert (papers / "seg.dcm").read_bytes() == seg
    async with Reader(env, "audit.in.operator", AuditEvent) as reads:
        (read,) = await reads.wait_for(1, timeout=30)
    assert read.action == "read:results" and read.resource == key.decode()
    async with Reader(env, "audit.in.exporter", AuditEvent) as audit:
        events = await audit.wait_for(2, timeout=30)
    assert {e.action for e in events} == {"export:deidentified"}
    assert all(e.actor == "exporter" and ph.series_instance_uid not in e.resource for e in events)

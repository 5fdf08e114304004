"""The DICOM gateway with Debian's dcmtk (storescu, echoscu) as the real modality."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from services.ingest.main import build
from shared.config import IngestSettings
from shared.dicom import phantom
from shared.runtime.stage import StageRunner
from shared.schemas import SeriesReady
from shared.stack.broker import free_port
from tests.helpers import (
    Env,
    Reader,
    StageProcess,
    metrics_text,
    running,
    wait_until_sync,
)

pytestmark = pytest.mark.integration


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: 'make setup' installs Debian's dcmtk"
    return path


@pytest.fixture
def gateway(env: Env, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    proc = StageProcess(
        env.service_env(
            "gateway",
            RADSTREAM_GATEWAY__PORT=str(port),
            RADSTREAM_GATEWAY__ALLOWED_AE_TITLES="STORESCU,ECHOSCU,CT-SCANNER-1",
            RADSTREAM_GATEWAY__PLAIN_DICOM="true",
        ),
        "services.gateway.main",
        tmp_path / "gateway.log",
    ).start()
    wait_until_sync(proc.ready, 60, "gateway ready")
    yield port, proc
    assert proc.terminate() == 0


def storescu(
    port: int, files: list[Path], aet: str = "STORESCU", *extra: str
) -> subprocess.CompletedProcess[str]:
    cmd = [
        dcmtk("storescu"),
        "-aet",
        aet,
        "-aec",
        "RADSTREAM",
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


async def test_storescu_series_become_exactly_one_series_ready_each(
    env: Env, gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port, _ = gateway
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "RADSTREAM", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr
    ct_dir = (
        Path(str(get_testdata_file("CT_small.dcm", download=False))).parent
        / "dicomdirtests"
        / "77654033"
        / "CT2"
    )
    ct_files = sorted(p for p in ct_dir.rglob("*") if p.is_file())
    ph = phantom.chest_ct(tmp_path / "ph", seed=21, size=64, slices=12, nodules_mm=())
    j2k = Path(str(get_testdata_file("693_J2KI.dcm", download=False)))

    settings = env.settings(
        "ingest", metrics_port=free_port(), ingest=IngestSettings(inactivity_timeout_s=600)
    )
    async with running(StageRunner(build(settings, env.keyring), settings, env.keyring)):
        for files, extra in ((ct_files, ()), (ph.files, ()), ([j2k], ("-xw",))):  # -xw: JPEG 2000
            res = await asyncio.to_thread(storescu, port, files, "STORESCU", *extra)
            assert res.returncode == 0, res.stderr
        async with Reader(env, "series", SeriesReady) as out:
            await out.wait_for(3)
            await out.drain(2.0)
    counts = sorted((r.instance_count, r.completed_by) for r in out.records)
    assert counts == [(1, "marker"), (len(ct_files), "marker"), (12, "marker")]
    assert len(ct_files) == 4
    assert {r.series_instance_uid for r in out.records} >= {ph.series_instance_uid}


def test_unknown_calling_ae_title_is_rejected_at_association(
    env: Env, gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    port, proc = gateway
    ph = phantom.chest_ct(tmp_path / "ph", seed=22, size=32, slices=2, nodules_mm=())
    res = storescu(port, ph.files, "INTRUDER")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    text = metrics_text(proc.port)
    assert 'radstream_gateway_associations_total{outcome="rejected"} 1.0' in text
    assert 'radstream_gateway_instances_total{outcome="stored"}' not in text  # nothing got in


async def test_every_association_is_audited_on_the_gateway_s_intake(
    env: Env, gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Accepted, released and rejected associations reach the audit trail, as the gateway
    principal (its own intake topic), naming the calling AE title and nothing of a patient."""
    from shared.schemas import AuditEvent

    port, _ = gateway
    echo = [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "RADSTREAM", "127.0.0.1", str(port)]
    ok = await asyncio.to_thread(subprocess.run, echo, capture_output=True, timeout=60)
    assert ok.returncode == 0
    ph = phantom.chest_ct(tmp_path / "ph", seed=23, size=32, slices=1, nodules_mm=())
    assert (await asyncio.to_thread(storescu, port, ph.files, "INTRUDER")).returncode != 0
    async with Reader(env, "audit.in.gateway", AuditEvent) as audit:
        events = await audit.wait_for(3, timeout=60)
    seen = {(e.action, e.resource, e.outcome) for e in events}
    assert ("association:accepted", "ae:ECHOSCU", "success") in seen
    assert ("association:released", "ae:ECHOSCU", "success") in seen
    assert ("association:rejected", "ae:INTRUDER", "denied") in seen
    assert all(e.actor == "gateway" for e in events)

"""Segmentation against the real broker: findings first, then the results stage's SEG, SR and
pictures, read back with the results CLI; kills."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from services.preprocess.core import PreprocessCore
from services.results.main import build as build_results
from services.segmentation.main import build
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.runtime.stage import Context, StageRunner
from shared.schemas import ResultsReady, SegmentationDone, VolumePrepared
from shared.stack.broker import free_port
from shared.storage import BlobStore, LocalDirBackend
from tests.helpers import REPO, Env, Reader, StageProcess, running, wait_until
from tests.pipeline import files, series_ready

pytestmark = pytest.mark.integration


def volumes(env: Env, tmp: Path, phantoms: list[phantom.Phantom]) -> list[VolumePrepared]:
    store = BlobStore(LocalDirBackend(env.settings("segmentation").blob_path), env.keyring)
    core = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
    ctx = Context("offline", 0, 0, b"k", 0, None, env.keyring)
    return [core.handle(series_ready(files(ph.files), store, env.keyring), ctx) for ph in phantoms]


async def test_findings_then_seg_sr_and_pictures_end_to_end_with_results_cli(
    env: Env, tmp_path: Path
) -> None:
    chest = phantom.chest_ct(tmp_path / "chest", seed=41, size=256, slices=40, nodules_mm=(10.0,))
    head = phantom.head_ct(tmp_path / "head", seed=42, size=192, slices=32, bleed_ml=6.0)
    inputs = volumes(env, tmp_path, [chest, head])
    await env.produce(
        "volumes", [(env.keyring.keyed_hash(v.series_instance_uid), v) for v in inputs]
    )
    settings = env.settings("segmentation", metrics_port=free_port(), device="cpu")
    async with running(StageRunner(build(settings, env.keyring), settings, env.keyring)):
        async with Reader(env, "findings", SegmentationDone) as out:
            await out.wait_for(2, timeout=120)
    by_task = {d.task: d for d in out.records}
    nodules = [f for f in by_task["chest_ct"].findings if f.type == "nodule"]
    assert len(nodules) == 1 and abs((nodules[0].diameter_mm or 0) - 10.0) <= 1.5
    bleeds = [f for f in by_task["head_ct"].findings if f.type == "haemorrhage"]
    assert (
        len(bleeds) == 1 and abs((bleeds[0].volume_ml or 0) - head.bleed_ml) <= 0.15 * head.bleed_ml
    )
    # findings leave without the paperwork; the results stage makes it from them
    assert all(d.seg is None and not d.overlays and d.masks is not None for d in out.records)
    results = env.settings("results", metrics_port=free_port(), device="cpu")
    async with running(
        StageRunner(build_results(results, env.keyring), results, env.keyring)
    ):
        async with Reader(env, "results", ResultsReady) as papers:
            await papers.wait_for(2, timeout=120)
    assert all(r.seg and r.sr and r.overlays for r in papers.records)
    assert all(r.delivery == "not_configured" for r in papers.records)

    target = tmp_path / "results"
    proc = await asyncio.create_subprocess_exec(
        str(REPO / ".venv" / "bin" / "radstream"),
        "results",
        head.series_instance_uid,
        "--out",
        str(target),
        env=env.service_env("operator"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    data = json.loads((target / "findings.json").read_text())
    assert data["series_instance_uid"] == head.series_instance_uid and data["task"] == "head_ct"
    paper = json.loads((target / "results.json").read_text())
    assert (paper["series_instance_uid"], paper["revision"]) == (head.series_instance_uid, 1)
    assert (target / "seg.dcm").read_bytes()[128:132] == b"DICM"
    assert (target / "sr.dcm").read_bytes()[128:132] == b"DICM"
    pngs = list(target.glob("*.png"))
    assert pngs and all(
        p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs
    )


async def test_killed_mid_stream_exactly_one_result_per_volume(env: Env, tmp_path: Path) -> None:
    phs = [
        phantom.head_ct(
            tmp_path / f"h{i}", seed=300 + i, size=128, slices=24, bleed_ml=3.0 if i % 2 else 0
        )
        for i in range(8)
    ]
    inputs = volumes(env, tmp_path, phs)
    await env.produce(
        "volumes", [(env.keyring.keyed_hash(v.series_instance_uid), v) for v in inputs]
    )
    env_vars = env.service_env(
        "segmentation", RADSTREAM_DEVICE="cpu", RADSTREAM_SESSION_TIMEOUT_S="6"
    )
    async with Reader(env, "findings", SegmentationDone) as out:
        for k, threshold in enumerate(sorted(random.Random(3).sample(range(1, 7), 3))):
            proc = StageProcess(
                env_vars, "services.segmentation.main", tmp_path / f"s{k}.log"
            ).start()

            async def reached(t: int = threshold) -> bool:
                await out.poll()
                return len(out.records) >= t

            await wait_until(reached, 120, f"{threshold} results")
            proc.kill()
        last = StageProcess(env_vars, "services.segmentation.main", tmp_path / "s-last.log").start()
        await out.wait_for(len(inputs), timeout=180)
        await out.drain(3.0)
        assert last.terminate() == 0
    assert sorted(d.series_instance_uid for d in out.records) == sorted(
        v.series_instance_uid for v in inputs
    )


async def test_onnx_plugin_end_to_end_in_the_service(env: Env, tmp_path: Path) -> None:
    from tests import onnx_model

    model = onnx_model.build(tmp_path / "bright.onnx", size=64)
    head = phantom.head_ct(tmp_path / "head", seed=51, size=128, slices=16, bleed_ml=4.0)
    (vp,) = volumes(env, tmp_path, [head])
    await env.produce("volumes", [(env.keyring.keyed_hash(vp.series_instance_uid), vp)])
    proc = StageProcess(
        env.service_env(
            "segmentation",
            RADSTREAM_DEVICE="cpu",
            RADSTREAM_SEGMENTATION__ONNX_MODEL=str(model),
            RADSTREAM_SEGMENTATION__ONNX_CONFIG=onnx_model.CONFIG,
        ),
        "services.segmentation.main",
        tmp_path / "seg.log",
    ).start()
    try:
        async with Reader(env, "findings", SegmentationDone) as out:
            (done,) = await out.wait_for(1, timeout=120)
    finally:
        assert proc.terminate() == 0
    types = {f.type for f in done.findings}
    assert {"haemorrhage", "brain", "onnx:bone"} <= types  # classical task and the model, together
    assert done.parameters.get("onnx_model") == "bright"
    # no patient identifiers in the service's log
    log = (tmp_path / "seg.log").read_text()
    assert head.series_instance_uid not in log and head.study_instance_uid not in log
    assert "PHANTOM" not in log

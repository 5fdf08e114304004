"""The whole pipeline, every service a real process, the real broker and a real Orthanc:
phantoms with lesions yield the expected alerts (one per finding), the normal study none; the alerts
come while the results service is still down (the alert never waits for the paperwork), then
the results service makes each series' SEG and SR, which reach the PACS exactly once and join
to the alerts by series, revision and finding; killing a service mid-run changes nothing. A
real Prometheus (Debian's) scrapes every stage meanwhile: the end-to-end latency histogram
holds one sample per alert, every stage has throughput, every target is up."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.schemas import Alert, ResultsReady, SegmentationDone, VolumePrepared
from shared.topology import STAGE_NAMES
from tests.helpers import REPO, Env, Orthanc, Prometheus, Reader, StageProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICES = STAGE_NAMES


async def test_pipeline_end_to_end_with_orthanc_and_a_kill(env: Env, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {"RADSTREAM": "RADSTREAM"}).start()
    extra = {
        "RADSTREAM_DEVICE": "cpu",
        "RADSTREAM_SESSION_TIMEOUT_S": "6",
        "RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S": "600",
        "RADSTREAM_RESULTS__PACS_HOST": "127.0.0.1",
        "RADSTREAM_RESULTS__PACS_PORT": str(pacs.dicom_port),
    }
    procs = {
        name: StageProcess(
            env.service_env(name, **extra), f"services.{name}.main", tmp_path / f"{name}.log"
        )
        for name in SERVICES
    }
    for name, proc in procs.items():
        if name != "results":  # the results service comes later: alerts must not need it
            proc.start()
    prom = Prometheus(tmp_path / "prometheus", {n: p.port for n, p in procs.items()}).start()
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
            procs["segmentation"].env,  # same metrics port: the same Prometheus target
            "services.segmentation.main",
            tmp_path / "segmentation-2.log",
        ).start()

        async with (
            Reader(env, "findings", SegmentationDone) as done,
            Reader(env, "alerts", Alert) as feed,
            Reader(env, "results", ResultsReady) as papers,
        ):
            await done.wait_for(3, timeout=240)
            await feed.wait_for(3, timeout=120)
            await feed.drain(3.0)
            await done.drain(1.0)
            # every alert is out and no SEG or SR exists yet: the results service is down
            await papers.drain(1.0)
            assert papers.records == [] and pacs.received() == []
            procs["results"].start()
            await papers.wait_for(3, timeout=240)
            await papers.drain(2.0)

        assert sorted(d.series_instance_uid for d in done.records) == sorted(
            p.series_instance_uid for p in (chest, head, normal)
        ), "one result per series, despite the kill"

        # the lesions alert at their severities (matched by place and size), the normal study raises
        # nothing; one alert per finding the rules select. The chest model also reports a
        # false pleural candidate at this cartoon lung's apex (0.84, high) and one below the
        # paging point: a known regression pinned by tests/unit/test_chest_pipeline.py::
        # test_cartoon_chest_raises_only_its_two_nodules (strict xfail); this test proves the
        # pipeline, benchmarks/quality.py measures the analysis.
        def alerted(ph: phantom.Phantom, finding: str, severity: str, size: float) -> bool:
            """An alert of this severity on the phantom's lesion of this size, at its place:
            the alert's centroid within 5 mm of the truth mask's lesion centroid."""
            place = lesion_centroid_mm(ph, "nodules" if finding == "nodule" else "haemorrhage", size)
            return any(
                (a.series_instance_uid, a.finding, a.severity)
                == (ph.series_instance_uid, finding, severity)
                and abs(a.measurements[key] - size) <= 0.25 * size
                and a.centroid_mm is not None
                and math.dist(a.centroid_mm, place) <= 5.0
                for a in feed.records
                for key in ("diameter_mm", "volume_ml")
                if key in a.measurements
            )

        assert alerted(chest, "nodule", "high", 10.0)
        assert alerted(chest, "nodule", "medium", 7.0)
        assert alerted(head, "haemorrhage", "critical", 5.0)
        assert not [a for a in feed.records if a.series_instance_uid == normal.series_instance_uid]
        n_alerts = len(feed.records)
        assert len({a.alert_id for a in feed.records}) == n_alerts
        assert all(a.latency_seconds < 120 for a in feed.records)
        # the findings carry no SEG: it is built after, by the results service
        assert all(d.seg is None and not d.overlays for d in done.records)

        # one results record per series; each alert joins to its finding's SEG segment
        assert sorted(r.series_instance_uid for r in papers.records) == sorted(
            d.series_instance_uid for d in done.records
        )
        by_series = {(r.series_instance_uid, r.revision): r for r in papers.records}
        for a in feed.records:
            paper = by_series[(a.series_instance_uid, a.revision)]
            (ref,) = [s for s in paper.segments if s.finding_label == a.finding_label]
            assert ref.segment_number and ref.in_sr
            assert a.created_at < paper.created_at  # the alert before the paperwork
        # each SEG and SR is in the PACS, and the PACS received each exactly once
        uids = sorted(
            u
            for r in papers.records
            for u in (r.seg_sop_instance_uid, r.sr_sop_instance_uid)
            if u is not None
        )
        assert len(uids) == 6 and all(r.delivery == "delivered" for r in papers.records)

        def in_pacs() -> list[str]:
            return sorted(
                i["SOPInstanceUID"]
                for i in pacs.instances()
                if i and i.get("Modality") in ("SEG", "SR")
            )

        async def delivered() -> bool:
            return in_pacs() == uids

        await wait_until(delivered, 60, "SEGs and SRs in Orthanc")
        assert len(pacs.get("/instances")) == 6
        assert sorted(pacs.received()) == uids

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
        assert len(rows) == n_alerts
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
        await _prometheus_saw_the_run(prom, alerts=len(feed.records))
    finally:
        for proc in procs.values():
            if proc.alive():
                proc.terminate()
        pacs.stop()
        prom.stop()


async def _prometheus_saw_the_run(prom: Prometheus, alerts: int) -> None:
    """What the dashboard and the SLO rules read, read from a real Prometheus."""

    seen: dict[str, dict[str, float]] = {}

    async def query(promql: str) -> dict[str, float]:
        """Series (labels but the name, as "k=v,...") → value."""
        rows = await asyncio.to_thread(prom.query, promql)
        seen[promql] = {
            ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__"): float(
                r["value"][1]
            )
            for r in rows
        }
        return seen[promql]

    async def equals(promql: str, want: dict[str, float]) -> bool:
        return await query(promql) == want

    async def until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
        try:
            await wait_until(cond, 60, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; Prometheus said {seen}") from None

    # every target up (the killed segmentation came back on its port)
    up = {
        f"instance=127.0.0.1:{port},job=radstream,service={name}": 1.0
        for name, port in prom.targets.items()
    }
    await until(lambda: equals('up{job="radstream"}', up), "every target up")
    # the e2e latency histogram: one sample per alert raised
    await until(
        lambda: equals("sum(radstream_e2e_latency_seconds_count)", {"": float(alerts)}),
        f"{alerts} e2e latency samples",
    )
    assert await query("sum(radstream_alerts_total)") == {"": float(alerts)}
    assert await query('sum(radstream_e2e_latency_seconds_bucket{le="+Inf"})') == {
        "": float(alerts)
    }
    # throughput of every stage, and the recording rule the dashboard and alerts use
    stages = {f"stage={n}" for n in SERVICES}

    async def throughput() -> bool:
        handled = await query('sum by (stage) (radstream_messages_total{outcome="ok"})')
        rule = await query("radstream:stage_throughput:rate5m")
        return set(handled) == stages and all(handled.values()) and set(rule) == stages

    await until(throughput, "throughput of every stage")


def lesion_centroid_mm(ph: phantom.Phantom, mask: str, size: float) -> tuple[float, ...]:
    """Patient coordinates (x, y, z mm) of the truth mask's lesion closest to ``size``
    (diameter in mm for nodules, volume in mL for a bleed), from the phantom's geometry: axial
    slices, ImagePositionPatient at -(n - 1) * spacing / 2 on each axis."""
    labels, n = ndi.label(ph.truth[mask])
    assert n, f"no {mask} in the phantom's truth"
    dz, dy, dx = ph.spacing
    counts = ndi.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
    vox_ml = dz * dy * dx / 1000
    sizes = [
        (6 * c * vox_ml * 1000 / math.pi) ** (1 / 3) if mask == "nodules" else c * vox_ml
        for c in counts
    ]
    best = min(range(n), key=lambda i: abs(sizes[i] - size))
    cz, cy, cx = ndi.center_of_mass(labels == best + 1)
    nz, ny, nx = labels.shape
    return (
        (cx - (nx - 1) / 2) * dx,
        (cy - (ny - 1) / 2) * dy,
        (cz - (nz - 1) / 2) * dz,
    )

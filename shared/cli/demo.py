"""``radstream demo``: the whole pipeline for a newcomer, on the local stack.

Starts the stack (broker, gateway, ingest, preprocess, segmentation, alert, results, Orthanc
when installed), publishes a chest CT phantom with nodules, a head CT phantom with a
haemorrhage, a normal chest CT and real pydicom sample files (one series through the gateway
with dcmtk's ``storescu``), shows alerts as they arrive, waits for the results stage's
paperwork (DICOM SEG, SR, pictures, PACS delivery), then writes ``out/demo/report.html``
(findings, overlay pictures, SEG/SR and their delivery, per-stage and end-to-end latency per
study). The stack keeps running.
"""

from __future__ import annotations

import asyncio
import html
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from shared.config import Settings
from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.runtime.reader import read_topic
from shared.schemas import (
    Alert,
    BlobRef,
    ResultsReady,
    SegmentationDone,
    SeriesReady,
    VolumePrepared,
)
from shared.security.envelope import Keyring
from shared.security.paths import UnsafeName, write_new
from shared.stack.broker import REPO
from shared.stack.local import LocalStack
from shared.storage import BlobStore, LocalDirBackend


@dataclass
class Study:
    name: str
    description: str
    series_uid: str
    expect_alerts: int
    files: list[Path] = field(default_factory=list)


def _sample_files() -> tuple[list[Path], list[Path]]:
    from pydicom.data import get_testdata_file

    single = [
        Path(str(get_testdata_file(n, download=False))) for n in ("CT_small.dcm", "MR_small.dcm")
    ]
    ct_dir = single[0].parent / "dicomdirtests" / "77654033" / "CT2"
    return single, sorted(p for p in ct_dir.rglob("*") if p.is_file())


def run_demo(stack: LocalStack, out: Path, console: Console, wait_s: float = 300.0) -> Path:
    with console.status("starting the local stack (first run fetches Apache Kafka)..."):
        for line in stack.up():
            console.print(f"  [green]✓[/] {line}")
    settings = Settings(home=stack.home)
    # each step as the party that does it, with that party's keys only
    keyring = Keyring.from_file(stack.key_file("operator"))
    scanner_keys = Keyring.from_file(stack.key_file("scanner"))
    pager_keys = Keyring.from_file(stack.key_file("alert-consumer"))
    work = stack.home / "demo"
    shutil.rmtree(work, ignore_errors=True)
    # pixels from fixed seeds (the same findings on every run), UIDs fresh on every run (so a
    # second demo against the same stack is new series, not duplicates)
    run_id = int(time.time()) % 1_000_000
    with console.status("writing phantom studies..."):
        chest = phantom.chest_ct(
            work / "chest", seed=2, size=256, slices=64, nodules_mm=(11.0, 7.0), uid_seed=run_id
        )
        head = phantom.head_ct(
            work / "head", seed=3, size=256, slices=40, bleed_ml=6.0, uid_seed=run_id + 1
        )
        normal = phantom.chest_ct(
            work / "normal", seed=4, size=256, slices=48, nodules_mm=(), uid_seed=run_id + 2
        )
    studies = [
        Study(
            "chest",
            "Chest CT phantom, nodules of 11 and 7 mm",
            chest.series_instance_uid,
            2,
            chest.files,
        ),
        Study("head", "Head CT phantom, 6 mL haemorrhage", head.series_instance_uid, 1, head.files),
        Study("normal", "Normal chest CT phantom", normal.series_instance_uid, 0, normal.files),
    ]
    singles, ct_series = _sample_files()

    async def publish() -> None:
        async with Publisher(
            stack.broker.settings_for("scanner"),
            scanner_keys,
            source="demo",
            topic=settings.topic("instances"),
        ) as pub:
            for study in studies:
                for f in study.files:
                    await pub.publish(f.read_bytes())
                await pub.end_series(study.series_uid, len(study.files))
                console.print(f"  published {study.description} ({len(study.files)} slices)")
            for f in singles:
                p = await pub.publish(f.read_bytes())
                if p.series_instance_uid:
                    await pub.end_series(p.series_instance_uid, 1)
            console.print(f"  published pydicom samples: {', '.join(f.name for f in singles)}")

    asyncio.run(publish())
    storescu = shutil.which("storescu")
    if storescu:
        res = subprocess.run(
            [
                storescu,
                "-aet",
                "STORESCU",
                "-aec",
                "RADSTREAM",
                "127.0.0.1",
                str(stack.ports.gateway_dicom),
                *map(str, ct_series),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        state = "sent" if res.returncode == 0 else f"failed ({res.stderr.strip()[:120]})"
        console.print(
            f"  storescu → gateway: pydicom's dicomdirtests CT series ({len(ct_series)} images) {state}"
        )

    expected = sum(s.expect_alerts for s in studies)
    console.print(f"\n[bold]alerts as they arrive[/] (expecting {expected}):")
    wanted = {s.series_uid for s in studies}
    alerts: list[Alert] = []

    async def follow() -> None:
        async for item in read_topic(
            stack.broker.settings_for("alert-consumer"),
            settings.topic("alerts"),
            Alert,
            pager_keys,
            follow=True,
            timeout_s=wait_s,
        ):
            a = item.record
            if a is None or a.series_instance_uid not in wanted:
                continue
            alerts.append(a)
            measures = ", ".join(f"{k} {v:g}" for k, v in a.measurements.items())
            console.print(
                f"  [bold red]{a.severity.upper():8}[/] {a.finding_label:14} {measures:40} latency {a.latency_seconds:.1f} s"
            )
            if len(alerts) >= expected:
                return

    started = time.monotonic()
    asyncio.run(follow())

    async def analysed() -> None:
        """Every study's results in (SEG, SR and pictures come after the alerts; the normal
        study may finish after the last alert), so the report is complete."""
        pending = set(wanted)
        async for item in read_topic(
            stack.broker.settings_for("operator"),
            settings.topic("results"),
            ResultsReady,
            keyring,
            follow=True,
            timeout_s=max(1.0, wait_s - (time.monotonic() - started)),
            from_beginning=True,
        ):
            if item.record is not None:
                pending.discard(item.record.series_instance_uid)
            if not pending:
                return

    asyncio.run(analysed())
    report = write_report(stack, settings, keyring, studies, out)
    console.print(f"\nreport: [bold]{report}[/]")
    console.print(
        "the stack keeps running: [bold]make down[/] (or .venv/bin/radstream stack down) stops it;"
    )
    console.print("  .venv/bin/radstream alerts --follow   ·   .venv/bin/radstream stack status")
    return report


def _collect(
    stack: LocalStack, settings: Settings, keyring: Keyring, wanted: set[str]
) -> dict[str, dict[str, Any]]:
    kafka = stack.broker.settings_for("operator")
    by: dict[str, dict[str, Any]] = {uid: {} for uid in wanted}

    async def read(topic: str, model: Any, key: str) -> None:
        async for item in read_topic(kafka, settings.topic(topic), model, keyring):
            rec = item.record
            if rec is not None and rec.series_instance_uid in wanted:
                if key == "alerts":
                    by[rec.series_instance_uid].setdefault("alerts", []).append(rec)
                else:
                    by[rec.series_instance_uid][key] = rec

    async def all_topics() -> None:
        await read("series", SeriesReady, "series")
        await read("volumes", VolumePrepared, "volume")
        await read("findings", SegmentationDone, "done")
        await read("results", ResultsReady, "results")
        await read("alerts", Alert, "alerts")

    asyncio.run(all_topics())
    return by


def study_html(
    study: Study, rec: dict[str, Any], out: Path, fetch: Callable[[BlobRef], bytes]
) -> list[str]:
    """One study's part of the report; its SEG, SR and pictures are written into ``out``.
    Every text from a record is escaped (a task or overlay name is data, never markup), and
    every file name from a record is checked (:mod:`shared.security.paths`)."""
    esc = html.escape
    parts: list[str] = []
    done: SegmentationDone | None = rec.get("done")
    paperwork: ResultsReady | None = rec.get("results")
    series: SeriesReady | None = rec.get("series")
    volume: VolumePrepared | None = rec.get("volume")
    alerts: list[Alert] = rec.get("alerts", [])
    parts.append(f"<h2>{esc(study.description)}</h2>")
    if done is None:
        parts.append("<p>not processed (yet)</p>")
        return parts
    rows = "".join(
        f"<tr><td>{esc(f.type)}</td><td>{esc(f.label)}</td><td>{'' if f.volume_ml is None else f'{f.volume_ml:.2f}'}</td>"
        f"<td>{'' if f.diameter_mm is None else f'{f.diameter_mm:.1f}'}</td><td>{', '.join(f'{v:.0f}' for v in f.centroid_mm or [])}</td></tr>"
        for f in done.findings
    )
    parts.append(
        f"<p>task <b>{esc(done.task)}</b>, revision {done.revision}</p><table><tr><th>finding</th><th>label</th><th>volume mL</th><th>diameter mm</th><th>centroid (LPS mm)</th></tr>{rows}</table>"
    )
    if alerts:
        parts.append(
            "<p>alerts: "
            + ", ".join(
                f"<span class='{esc(a.severity)}'>{esc(a.severity)} {esc(a.finding_label)}</span>"
                for a in alerts
            )
            + "</p>"
        )
    else:
        parts.append("<p>no alert</p>")
    ingest_s = (series.ready_at - series.last_published_at).total_seconds() if series else None
    pre_s = volume.timings_s.get("total") if volume else None
    seg_s = done.timings_s.get("total")
    e2e = max((a.latency_seconds for a in alerts), default=None)
    parts.append(
        "<p>latency: "
        + " · ".join(
            f"{name} {value:.2f} s"
            for name, value in (
                ("ingest (last slice → series ready)", ingest_s),
                ("preprocess", pre_s),
                ("segmentation", seg_s),
                ("end to end (last slice → alert)", e2e),
            )
            if value is not None
        )
        + "</p>"
    )
    if paperwork is None:
        parts.append("<p>results (SEG, SR, pictures): not in yet</p>")
        return parts
    objects = [
        ("DICOM SEG", paperwork.seg, "seg.dcm", f"{paperwork.seg_frames} frames"),
        ("DICOM SR (TID 1500)", paperwork.sr, "sr.dcm", "measurements per finding"),
    ]
    listed = []
    for what, ref, suffix, note in objects:
        if ref is not None:
            name = write_new(out, f"{study.name}-{suffix}", fetch(ref)).name
            listed.append(f"<a href='{esc(name)}'>{what}</a> ({esc(note)})")
    delivered = esc(", ".join(f"{d.object} {d.outcome}" for d in paperwork.deliveries))
    parts.append(
        f"<p>results: {' · '.join(listed) or 'no DICOM objects for this task'}; PACS: "
        f"{esc(paperwork.delivery)}{f' ({delivered})' if delivered else ''}; built in "
        f"{paperwork.timings_s.get('total', 0.0):.2f} s after the findings</p>"
    )
    for overlay in paperwork.overlays:
        try:
            name = write_new(out, f"{study.name}-{overlay.name}", fetch(overlay.blob)).name
        except UnsafeName:
            parts.append("<p>a picture with an unsafe name was left out</p>")
            continue
        parts.append(f"<img src='{esc(name)}' alt='{esc(overlay.name)}'>")
    return parts


def write_report(
    stack: LocalStack, settings: Settings, keyring: Keyring, studies: list[Study], out: Path
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    store = BlobStore(LocalDirBackend(settings.blob_path), keyring)
    data = _collect(stack, settings, keyring, {s.series_uid for s in studies})
    parts = [
        "<!doctype html><meta charset='utf-8'><title>RadStream demo</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{margin:4px;border:1px solid #999;width:256px}"
        ".critical{color:#b00;font-weight:bold}.high{color:#d40}.medium{color:#a80}</style>",
        "<h1>RadStream demo report</h1>",
        f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. Phantom studies with known ground truth; "
        "identifiers are synthetic.</p>",
    ]
    for study in studies:
        parts.extend(study_html(study, data.get(study.series_uid, {}), out, store.get))
    report = out / "report.html"
    report.write_text("\n".join(parts))
    return report


def default_out() -> Path:
    return REPO / "out" / "demo"

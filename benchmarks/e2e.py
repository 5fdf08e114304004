"""End-to-end latency: 20 chest CT phantoms of 64 slices at 512², published one after another
(one in flight) and then with 4 in flight, through ingest → preprocess → segmentation → alert,
every service its own process on a throw-away broker, this machine's CPU. Latency is the
alert's own figure: last instance published → alert created. Prints p50, p99, series per
minute, and where the time goes (per-stage handler seconds; the rest is transport, queueing
and transaction commits)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import emit, parse_args, prepare, start_service, temporary_broker
from benchmarks.ingest import variants
from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.runtime.reader import read_topic
from shared.schemas import Alert, SegmentationDone, SeriesReady, VolumePrepared

SERVICES = ("ingest", "preprocess", "segmentation", "alert")


async def run_batch(broker, keyring, prefix, series_list, uids, in_flight) -> dict[str, float]:  # type: ignore[no-untyped-def]
    latencies: dict[str, float] = {}
    done_evt: dict[str, asyncio.Event] = {uid: asyncio.Event() for uid in uids}

    async def follow() -> None:
        async for item in read_topic(
            broker.settings_for("alert-consumer"),
            prefix + "alerts",
            Alert,
            keyring,
            follow=True,
            timeout_s=1800,
            from_beginning=False,
        ):
            a = item.record
            if (
                a is not None
                and a.series_instance_uid in done_evt
                and a.series_instance_uid not in latencies
            ):
                latencies[a.series_instance_uid] = a.latency_seconds
                done_evt[a.series_instance_uid].set()
            if len(latencies) == len(uids):
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(1.0)  # the follower seeks to the end before anything is published
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(in_flight)
    async with Publisher(
        broker.settings_for("scanner"), keyring, source="bench", topic=prefix + "instances"
    ) as pub:

        async def one(series: list[bytes], uid: str) -> None:
            async with sem:
                await pub.publish_many(series, window=64)
                await pub.end_series(uid, len(series))
                waiter = asyncio.create_task(done_evt[uid].wait())
                await asyncio.wait(
                    {waiter, watcher}, timeout=600, return_when=asyncio.FIRST_COMPLETED
                )
                if watcher.done() and not done_evt[uid].is_set():
                    watcher.result()  # surfaces the follower's error
                    raise RuntimeError("alert feed ended before every alert arrived")

        await asyncio.gather(*(one(s, u) for s, u in zip(series_list, uids, strict=True)))
    elapsed = time.perf_counter() - t0
    await watcher
    lat = np.array([latencies[u] for u in uids])
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "series_per_minute": len(uids) / elapsed * 60,
    }


async def breakdown(broker, keyring, prefix, uids) -> dict[str, float]:  # type: ignore[no-untyped-def]
    op = broker.settings_for("operator")
    parts: dict[str, list[float]] = {"ingest_assembly": [], "preprocess": [], "segmentation": []}
    async for item in read_topic(op, prefix + "series", SeriesReady, keyring):
        r = item.record
        if r is not None and r.series_instance_uid in uids:
            parts["ingest_assembly"].append((r.ready_at - r.last_published_at).total_seconds())
    async for item in read_topic(op, prefix + "volumes", VolumePrepared, keyring):
        if item.record is not None and item.record.series_instance_uid in uids:
            parts["preprocess"].append(item.record.timings_s["total"])
    async for item in read_topic(op, prefix + "findings", SegmentationDone, keyring):
        if item.record is not None and item.record.series_instance_uid in uids:
            parts["segmentation"].append(item.record.timings_s["total"])
    return {k: round(float(np.median(v)), 3) for k, v in parts.items() if v}


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    n, slices = (4, 32) if args.quick else (20, 64)
    with temporary_broker() as broker:
        prefix = "e2e."
        keyring_path, keyring = prepare(broker, prefix)
        ph = phantom.chest_ct(
            broker.home / "template", seed=3, size=512, slices=slices, nodules_mm=(10.0,)
        )
        template = [f.read_bytes() for f in ph.files]
        all_series = variants(template, ph.series_instance_uid, 2 * n + 1)
        uids = [ph.series_instance_uid[:-6] + f"{s:06d}" for s in range(2 * n + 1)]
        procs = [
            start_service(broker, prefix, keyring_path, name, RADSTREAM_DEVICE="cpu")
            for name in SERVICES
        ]
        try:
            # warm-up (not measured): the first series pays every process's first-use costs
            await run_batch(broker, keyring, prefix, all_series[2 * n :], uids[2 * n :], 1)
            one = await run_batch(broker, keyring, prefix, all_series[:n], uids[:n], 1)
            four = await run_batch(
                broker, keyring, prefix, all_series[n : 2 * n], uids[n : 2 * n], 4
            )
            parts = await breakdown(broker, keyring, prefix, set(uids[:n]))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    figures = {
        "series": n,
        "slices": slices,
        "p50_seconds": round(one["p50"], 2),
        "p99_seconds": round(one["p99"], 2),
        "series_per_minute": round(one["series_per_minute"], 1),
        "p50_seconds_4_in_flight": round(four["p50"], 2),
        "p99_seconds_4_in_flight": round(four["p99"], 2),
        "series_per_minute_4_in_flight": round(four["series_per_minute"], 1),
        "breakdown_median_seconds": parts,
    }
    emit(
        figures,
        args.json,
        [
            f"e2e: {n} chest CT phantoms of {slices} slices at 512², cpu, last instance published → alert",
            f"  one in flight: p50 {one['p50']:.2f} s, p99 {one['p99']:.2f} s, {one['series_per_minute']:.1f} series/min",
            f"  four in flight: p50 {four['p50']:.2f} s, p99 {four['p99']:.2f} s, {four['series_per_minute']:.1f} series/min",
            f"  where the time goes (median per series, one in flight): {parts}",
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())

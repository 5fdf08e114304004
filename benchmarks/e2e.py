"""End-to-end latency, last slice published → alert created, through ingest → preprocess →
segmentation → alert, every service its own process on a throw-away broker, this machine's
CPU; the results stage (SEG, SR, pictures after the alert) runs too, as in the real pipeline,
competing for the CPU:

* 20 chest CT phantoms of 64 slices at 512², one in flight, then 20 more with four in flight;
* 3 chest CT phantoms of 300 slices at 512², one in flight.

Latency is the alert's own figure (``latency_seconds``). Prints p50, p99, series per minute,
and where the time goes per hop (median over the one-in-flight series): ingest assembly
(last slice → SeriesReady sent), then for each stage the wait (the upstream's commit after
its send, the fetch, queueing: output record time − input record time − handler) and its
handler, the handlers' own parts (``preprocess_decode``, ``_calibrate``, ``_chain``,
``_store``; ``segmentation_segment`` is the task's compute, ``_outputs`` the mask storage) and
``not_task`` (last slice → alert minus the task: what the pipeline adds); and from each
service's /metrics the mean transaction commit, handler time and input wait per record. The
machine's load average is printed with the figures: it is shared, and they move with it.

Targets (issue 13): 64x512² one at a time p50 ≤ 1.0 s, p99 ≤ 2.0 s; four in flight p99 ≤ 4 s
and ≥ 40 series/min; 300x512² p99 ≤ 5 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import emit, parse_args, prepare, start_service, temporary_broker
from benchmarks.ingest import variants
from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.runtime.reader import read_topic
from shared.schemas import Alert, SegmentationDone, SeriesReady, VolumePrepared
from shared.stack.broker import free_port

SERVICES = ("ingest", "preprocess", "segmentation", "alert", "results")
HOP_METRICS = ("handler_seconds", "commit_seconds", "input_wait_seconds")


async def run_batch(broker, keyring, prefix, series_list, uids, in_flight) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    latencies: dict[str, float] = {}
    done_evt: dict[str, asyncio.Event] = {uid: asyncio.Event() for uid in uids}
    started = asyncio.Event()

    async def follow() -> None:
        async for item in read_topic(
            broker.settings_for("alert-consumer"),
            prefix + "alerts",
            Alert,
            keyring,
            follow=True,
            timeout_s=1800,
            from_beginning=False,
            on_start=started.set,
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
    await asyncio.wait(
        {asyncio.create_task(started.wait()), watcher}, return_when="FIRST_COMPLETED"
    )
    load_before = os.getloadavg()
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
        "load": [round(v, 1) for v in (*load_before, *os.getloadavg())],
    }


async def breakdown(broker, keyring, prefix, uids) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Per hop, median over ``uids`` (record times are the producers' send times)."""
    op = broker.settings_for("operator")
    at: dict[str, dict[str, float]] = defaultdict(dict)
    handler: dict[str, dict[str, float]] = defaultdict(dict)
    async for item in read_topic(op, prefix + "series", SeriesReady, keyring):
        r = item.record
        if r is not None and r.series_instance_uid in uids:
            at[r.series_instance_uid]["last_slice"] = r.last_published_at.timestamp()
            at[r.series_instance_uid]["series"] = item.timestamp_ms / 1000
    async for item in read_topic(op, prefix + "volumes", VolumePrepared, keyring):
        v = item.record
        if v is not None and v.series_instance_uid in uids:
            at[v.series_instance_uid]["volume"] = item.timestamp_ms / 1000
            handler[v.series_instance_uid]["preprocess"] = v.timings_s["total"]
            for k, val in v.timings_s.items():
                if k != "total":
                    handler[v.series_instance_uid][f"preprocess_{k}"] = val
    async for item in read_topic(op, prefix + "findings", SegmentationDone, keyring):
        d = item.record
        if d is not None and d.series_instance_uid in uids:
            at[d.series_instance_uid]["findings"] = item.timestamp_ms / 1000
            handler[d.series_instance_uid]["segmentation"] = d.timings_s["total"]
            for k, val in d.timings_s.items():
                if k != "total":
                    handler[d.series_instance_uid][f"segmentation_{k}"] = val
    async for item in read_topic(op, prefix + "alerts", Alert, keyring):
        a = item.record
        if a is not None and a.series_instance_uid in uids:
            at[a.series_instance_uid].setdefault("alert", a.created_at.timestamp())
    rows: dict[str, list[float]] = defaultdict(list)
    for uid in uids:
        t, h = at[uid], handler[uid]
        if len(t) < 5 or len(h) < 2:
            continue
        rows["ingest_assembly"].append(t["series"] - t["last_slice"])
        rows["preprocess_wait"].append(t["volume"] - t["series"] - h["preprocess"])
        rows["preprocess_handler"].append(h["preprocess"])
        rows["segmentation_wait"].append(t["findings"] - t["volume"] - h["segmentation"])
        rows["segmentation_handler"].append(h["segmentation"])
        rows["alert_wait_and_handler"].append(t["alert"] - t["findings"])
        for k, val in h.items():  # inside the handlers: decode, calibrate, chain, store, task…
            if "_" in k:
                rows[k].append(val)
        # everything on the critical path that is not the task's own compute
        rows["not_task"].append(t["alert"] - t["last_slice"] - h.get("segmentation_segment", 0.0))
    return {k: round(float(np.median(v)), 3) for k, v in rows.items()}


def scrape(ports: dict[str, int]) -> dict[str, dict[str, tuple[float, float]]]:
    """(sum, count) of the hop histograms per service, from its /metrics."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        values: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for line in text.splitlines():
            for metric in HOP_METRICS:
                for i, suffix in enumerate(("_sum", "_count")):
                    if line.startswith(f"radstream_{metric}{suffix}{{"):
                        values[metric][i] += float(line.rsplit(" ", 1)[1])
        out[name] = {m: (v[0], v[1]) for m, v in values.items()}
    return out


def means(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean seconds per record of each hop histogram between two scrapes."""
    out: dict[str, dict[str, float]] = {}
    for name in after:
        out[name] = {}
        for metric, (s1, c1) in after[name].items():
            s0, c0 = before.get(name, {}).get(metric, (0.0, 0.0))
            if c1 > c0:
                out[name][metric.removesuffix("_seconds")] = round((s1 - s0) / (c1 - c0), 4)
    return out


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    n, slices, n_big = (4, 32, 1) if args.quick else (20, 64, 3)
    with temporary_broker() as broker:
        prefix = "e2e."
        keyring_path, keyring = prepare(broker, prefix)
        ph = phantom.chest_ct(
            broker.home / "template", seed=3, size=512, slices=slices, nodules_mm=(10.0,)
        )
        template = [f.read_bytes() for f in ph.files]
        all_series = variants(template, ph.series_instance_uid, 2 * n + 1)
        uids = [ph.series_instance_uid[:-6] + f"{s:06d}" for s in range(2 * n + 1)]
        ports = {name: free_port() for name in SERVICES}
        procs = [
            start_service(
                broker,
                prefix,
                keyring_path,
                name,
                RADSTREAM_DEVICE="cpu",
                RADSTREAM_METRICS_PORT=str(ports[name]),
            )
            for name in SERVICES
        ]
        try:
            # warm-up (not measured): the first series pays every process's first-use costs
            await run_batch(broker, keyring, prefix, all_series[2 * n :], uids[2 * n :], 1)
            before = scrape(ports)
            one = await run_batch(broker, keyring, prefix, all_series[:n], uids[:n], 1)
            hop_means = means(before, scrape(ports))
            four = await run_batch(
                broker, keyring, prefix, all_series[n : 2 * n], uids[n : 2 * n], 4
            )
            parts = await breakdown(broker, keyring, prefix, set(uids[:n]))
            del all_series, template
            big_ph = phantom.chest_ct(
                broker.home / "big", seed=5, size=512, slices=300, nodules_mm=(10.0,)
            )
            big_template = [f.read_bytes() for f in big_ph.files]
            big_series = variants(big_template, big_ph.series_instance_uid, n_big)
            big_uids = [big_ph.series_instance_uid[:-6] + f"{s:06d}" for s in range(n_big)]
            del big_template
            before = scrape(ports)
            big = await run_batch(broker, keyring, prefix, big_series, big_uids, 1)
            big_means = means(before, scrape(ports))
            big_parts = await breakdown(broker, keyring, prefix, set(big_uids))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    figures = {
        "series": n,
        "slices": slices,
        "cpus": os.cpu_count(),
        "p50_seconds": round(one["p50"], 2),
        "p99_seconds": round(one["p99"], 2),
        "series_per_minute": round(one["series_per_minute"], 1),
        "load_one_in_flight": one["load"],
        "p50_seconds_4_in_flight": round(four["p50"], 2),
        "p99_seconds_4_in_flight": round(four["p99"], 2),
        "series_per_minute_4_in_flight": round(four["series_per_minute"], 1),
        "load_4_in_flight": four["load"],
        "breakdown_median_seconds": parts,
        "hop_means_seconds": hop_means,
        "series_300": n_big,
        "p50_seconds_300": round(big["p50"], 2),
        "p99_seconds_300": round(big["p99"], 2),
        "load_300": big["load"],
        "breakdown_median_seconds_300": big_parts,
        "hop_means_seconds_300": big_means,
    }

    def hops(m: dict[str, dict[str, float]]) -> str:
        return "; ".join(
            f"{s} " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sorted(m[s].items()))
            for s in SERVICES
            if m.get(s)
        )

    emit(
        figures,
        args.json,
        [
            f"e2e, cpu, last slice published → alert ({os.cpu_count()} CPUs; load average "
            "1/5/15 min before → after each run in [])",
            f"  {n} x {slices}x512², one in flight: p50 {one['p50']:.2f} s, p99 {one['p99']:.2f} s,"
            f" {one['series_per_minute']:.1f} series/min  {one['load']}",
            f"  {n} x {slices}x512², four in flight: p50 {four['p50']:.2f} s, p99 "
            f"{four['p99']:.2f} s, {four['series_per_minute']:.1f} series/min  {four['load']}",
            f"  {n_big} x 300x512², one in flight: p50 {big['p50']:.2f} s, p99 {big['p99']:.2f} s"
            f"  {big['load']}",
            f"  where the time goes, {slices} slices (median per series): {parts}",
            f"    per record (mean, /metrics): {hops(hop_means)}",
            f"  where the time goes, 300 slices (median per series): {big_parts}",
            f"    per record (mean, /metrics): {hops(big_means)}",
        ],
        args.json_out,
    )


if __name__ == "__main__":
    asyncio.run(main())

"""Ingest throughput and memory: 512² CT instances through publish → ingest → SeriesReady.

Publishes N instances (default 4,000 × 512 KB ≈ 2.1 GB, in 20 series of 200 slices) with the
scanner SDK to a throw-away broker, runs the real ingest service as its own process, and
times from the first publish to the last SeriesReady. Samples the ingest process's RSS every
0.2 s (target: flat, under 400 MB). Prints instances/s, MB/s and peak RSS.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks.common import emit, parse_args, prepare, start_service, temporary_broker
from shared.dicom import phantom
from shared.ingress.publisher import Publisher
from shared.runtime.reader import read_topic
from shared.schemas import SeriesReady


def variants(
    template: list[bytes], series_uid: str, n_series: int, *, same_series: bool = False
) -> list[list[bytes]]:
    """n_series copies of a series, each with its own Series and SOP Instance UIDs (patched in
    place with same-length UIDs, so the files stay valid); ``same_series``: the copies keep the
    Series UID (more slices of one series)."""
    import io

    import pydicom

    sops = [
        str(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID)
        for d in template
    ]
    out = []
    for s in range(n_series):
        new_series = series_uid if same_series else series_uid[:-6] + f"{s:06d}"
        series = []
        for i, data in enumerate(template):
            new_sop = sops[i][:-9] + f"{s:03d}{i:06d}"
            series.append(
                data.replace(series_uid.encode(), new_series.encode()).replace(
                    sops[i].encode(), new_sop.encode()
                )
            )
        out.append(series)
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.samples.append(self.proc.memory_info().rss / 1e6)
            except psutil.Error:
                return


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    n_series, n_slices = (4, 50) if args.quick else (20, 200)
    with temporary_broker() as broker:
        prefix = "bench."
        keyring_path, keyring = prepare(broker, prefix)
        ph = phantom.chest_ct(
            broker.home / "template", seed=1, size=512, slices=n_slices, nodules_mm=(8.0,)
        )
        template = [f.read_bytes() for f in ph.files]
        all_series = variants(template, ph.series_instance_uid, n_series)
        total_bytes = sum(len(d) for s in all_series for d in s)
        proc = start_service(broker, prefix, keyring_path, "ingest")
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            t0 = time.perf_counter()
            async with Publisher(
                broker.settings_for("scanner"), keyring, source="bench", topic=prefix + "instances"
            ) as pub:
                for s, series in enumerate(all_series):
                    await pub.publish_many(series, window=32)
                    await pub.end_series(ph.series_instance_uid[:-6] + f"{s:06d}", len(series))
            t_pub = time.perf_counter() - t0
            ready = 0
            async for item in read_topic(
                broker.settings_for("operator"),
                prefix + "series",
                SeriesReady,
                keyring,
                follow=True,
                timeout_s=1200,
            ):
                if item.record is not None:
                    ready += 1
                    if ready == n_series:
                        break
            elapsed = time.perf_counter() - t0
        finally:
            sampler.done.set()
            proc.terminate()
            proc.wait(30)
    n = n_series * n_slices
    rss = sampler.samples or [0.0]
    figures = {
        "instances": n,
        "gb": round(total_bytes / 1e9, 2),
        "instances_per_s": round(n / elapsed, 1),
        "mb_per_s": round(total_bytes / 1e6 / elapsed, 1),
        "publish_seconds": round(t_pub, 1),
        "total_seconds": round(elapsed, 1),
        "peak_rss_mb": round(max(rss), 1),
        "rss_first_quarter_mb": round(max(rss[: max(1, len(rss) // 4)]), 1),
        "rss_last_quarter_mb": round(max(rss[-max(1, len(rss) // 4) :]), 1),
        "series_ready": ready,
    }
    emit(
        figures,
        args.json,
        [
            f"ingest: {n} instances of 512² CT ({figures['gb']} GB) in {n_series} series",
            f"  {figures['instances_per_s']} instances/s, {figures['mb_per_s']} MB/s (publish → SeriesReady, {figures['total_seconds']} s)",
            f"  ingest peak RSS {figures['peak_rss_mb']} MB (first quarter {figures['rss_first_quarter_mb']}, last quarter {figures['rss_last_quarter_mb']})",
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())

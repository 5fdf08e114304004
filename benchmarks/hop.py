"""One hop of the pipeline, one record at a time: an upstream stage commits a record (a
transaction, as every stage does), the runtime's pass-through stage consumes it, handles it
and commits its output, the next consumer (read_committed) sees it. Prints p50/p99 of the
upstream commit and of the hop (upstream committed → output visible downstream), with the
runtime's latency settings as they were before issue 13 (fetch wait 500 ms, linger 2 ms,
retry backoff 100 ms) and as they are now, on the same broker in one run.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks.common import emit, parse_args, prepare, temporary_broker
from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.passthrough import make_spec
from shared.runtime.stage import StageRunner
from shared.schemas import Probe
from shared.security.kafka import client_kwargs
from shared.stack.broker import LocalBroker, free_port

VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"fetch_max_wait_ms": 500, "producer_linger_ms": 2, "producer_retry_backoff_ms": 100},
    "now": {},  # the defaults in shared/config.py
}


async def wait_ready(runner: StageRunner[Probe], task: asyncio.Task[None]) -> None:
    """Until the stage owns its partitions (polled: the runner has no ready event)."""
    deadline = time.monotonic() + 120
    while not runner.ready:
        if task.done() or time.monotonic() > deadline:
            task.result()
            raise RuntimeError("the pass-through stage did not become ready")
        await asyncio.sleep(0.05)


async def one_variant(
    broker: LocalBroker, prefix: str, overrides: dict[str, Any], n: int
) -> dict[str, float]:
    keyring_path, keyring = prepare(broker, prefix)
    settings = Settings(
        home=broker.home,
        topic_prefix=prefix,
        keyring_file=keyring_path,
        kafka=broker.settings_for("preprocess"),
        metrics_port=free_port(),
        **overrides,
    )
    runner: StageRunner[Probe] = StageRunner(make_spec("preprocess"), settings, keyring)
    task = asyncio.create_task(runner.run())
    await wait_ready(runner, task)
    codec = Codec(keyring)
    src, dst = prefix + "series", prefix + "volumes"
    upstream = AIOKafkaProducer(
        transactional_id=f"{prefix}ingest.hop",
        linger_ms=settings.producer_linger_ms,
        retry_backoff_ms=settings.producer_retry_backoff_ms,
        **client_kwargs(broker.settings_for("ingest")),
    )
    reader = AIOKafkaConsumer(
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        **client_kwargs(broker.settings_for("operator")),
    )
    await upstream.start()
    await reader.start()
    tps = [TopicPartition(dst, p) for p in range(3)]
    ends = await reader.end_offsets(tps)
    reader.assign(tps)
    for tp in tps:
        reader.seek(tp, ends[tp])
    commits, hops = [], []
    try:
        for i in range(n):
            key = f"series-{i % 3}".encode()
            value, headers = codec.encode(src, key, Probe(id=f"h{i}", seq=i))
            t0 = time.perf_counter()
            async with upstream.transaction():
                await upstream.send(src, value, key=key, headers=headers)
            t1 = time.perf_counter()
            while not await reader.getmany(timeout_ms=1000):
                pass
            t2 = time.perf_counter()
            if i >= 5:  # the first records pay connection and coordinator set-up
                commits.append(t1 - t0)
                hops.append(t2 - t1)
    finally:
        await upstream.stop()
        await reader.stop()
        runner.stop()
        await task
    c, h = np.array(commits), np.array(hops)
    return {
        "commit_p50_s": round(float(np.percentile(c, 50)), 4),
        "commit_p99_s": round(float(np.percentile(c, 99)), 4),
        "hop_p50_s": round(float(np.percentile(h, 50)), 4),
        "hop_p99_s": round(float(np.percentile(h, 99)), 4),
    }


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    n = 25 if args.quick else 80
    figures: dict[str, Any] = {"records": n}
    with temporary_broker() as broker:
        for name, overrides in VARIANTS.items():
            figures[name] = await one_variant(broker, f"hop{name}.", overrides, n)
    lines = [f"one hop, one record at a time ({n}), this machine:"]
    for name in VARIANTS:
        f = figures[name]
        lines.append(
            f"  {name:6}: upstream commit p50 {f['commit_p50_s'] * 1000:.0f} ms, "
            f"p99 {f['commit_p99_s'] * 1000:.0f} ms; hop p50 {f['hop_p50_s'] * 1000:.0f} ms, "
            f"p99 {f['hop_p99_s'] * 1000:.0f} ms"
        )
    emit(figures, args.json, lines, args.json_out)


if __name__ == "__main__":
    asyncio.run(main())

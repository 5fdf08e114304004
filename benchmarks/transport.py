"""Transport overhead of the runtime: a raw aiokafka consume→produce copy (no transactions, no
encryption, no validation) against the runtime's pass-through stage (transactions, AES-GCM
envelopes, schema validation), on the same broker in one run, at 1 KB and 512 KB.

Both copy the same number of records between two topics over SASL_SSL, in this process; time
runs from the first record consumed to the last output acknowledged (raw) or committed
(runtime). Prints messages/s, MB/s and the ratio runtime/raw (target: >= 0.7 at 512 KB).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from benchmarks.common import emit, parse_args, temporary_broker
from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.passthrough import make_spec
from shared.runtime.stage import StageRunner
from shared.schemas import Probe
from shared.security.envelope import Keyring
from shared.security.kafka import client_kwargs
from shared.stack.broker import LocalBroker, free_port

MAX = 16 * 1024 * 1024


async def fill(
    broker: LocalBroker, topic: str, values: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> None:
    producer = AIOKafkaProducer(
        acks="all",
        max_request_size=MAX,
        linger_ms=5,
        max_batch_size=1 << 20,
        **client_kwargs(broker.settings_for("admin")),
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k, headers=h) for k, v, h in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_copy(broker: LocalBroker, src: str, dst: str, n: int) -> float:
    kw = client_kwargs(broker.settings_for("admin"))
    consumer = AIOKafkaConsumer(
        src,
        group_id=f"{src}.raw",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=MAX,
        fetch_max_bytes=64 * 1024 * 1024,
        **kw,
    )
    producer = AIOKafkaProducer(
        acks="all", max_request_size=MAX, linger_ms=2, max_batch_size=1 << 20, **kw
    )
    await consumer.start()
    await producer.start()
    copied, t0 = 0, None
    try:
        while copied < n:
            batches = await consumer.getmany(timeout_ms=200)
            if batches and t0 is None:
                t0 = time.perf_counter()
            futures = []
            for recs in batches.values():
                for rec in recs:
                    futures.append(
                        await producer.send(dst, rec.value, key=rec.key, headers=rec.headers)
                    )
            await asyncio.gather(*futures)
            copied += len(futures)
        assert t0 is not None
        return time.perf_counter() - t0
    finally:
        await consumer.stop()
        await producer.stop()


async def runtime_copy(
    broker: LocalBroker, prefix: str, keyring: Keyring, n: int, home: Path
) -> float:
    settings = Settings(
        home=home,
        topic_prefix=prefix,
        kafka=broker.settings_for("preprocess"),
        metrics_port=free_port(),
    )
    runner: StageRunner[Probe] = StageRunner(make_spec("preprocess"), settings, keyring)
    task = asyncio.create_task(runner.run())

    def done() -> float:
        return (
            runner.registry.get_sample_value(
                "radstream_messages_total", {"stage": "preprocess", "outcome": "ok"}
            )
            or 0.0
        )

    def consumed() -> float:
        return (
            runner.registry.get_sample_value("radstream_input_bytes_total", {"stage": "preprocess"})
            or 0.0
        )

    while consumed() == 0:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    while done() < n:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    runner.stop()
    await task
    return elapsed


async def measure(
    broker: LocalBroker, keyring: Keyring, size: int, n: int, home: Path
) -> dict[str, float]:
    tag = f"b{size}"
    raw_prefix, rt_prefix = f"{tag}raw.", f"{tag}rt."
    broker.bootstrap(raw_prefix)
    broker.bootstrap(rt_prefix)
    payload = b"\xa5" * size
    keys = [f"series-{i % 64}".encode() for i in range(n)]
    await fill(broker, raw_prefix + "series", [(k, payload, []) for k in keys])
    codec = Codec(keyring)
    src = rt_prefix + "series"
    records = []
    for i, k in enumerate(keys):
        value, headers = codec.encode(src, k, Probe(id=str(i), seq=i, payload=payload))
        records.append((k, value, headers))
    await fill(broker, src, records)
    raw_s = await raw_copy(broker, raw_prefix + "series", raw_prefix + "volumes", n)
    rt_s = await runtime_copy(broker, rt_prefix, keyring, n, home)
    mb = n * size / 1e6
    return {
        "messages": n,
        "raw_msgs_per_s": n / raw_s,
        "raw_mb_per_s": mb / raw_s,
        "runtime_msgs_per_s": n / rt_s,
        "runtime_mb_per_s": mb / rt_s,
        "ratio": raw_s / rt_s,
    }


async def main() -> None:
    args = parse_args(__doc__ or "")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    keyring = Keyring.generate()
    with temporary_broker() as broker:
        small = await measure(broker, keyring, 1024, 2000 if args.quick else 20000, broker.home)
        large = await measure(broker, keyring, 512 * 1024, 60 if args.quick else 600, broker.home)
    figures = {
        "ratio_1kb": round(small["ratio"], 3),
        "ratio_512kb": round(large["ratio"], 3),
        "1kb": {k: round(v, 1) for k, v in small.items()},
        "512kb": {k: round(v, 1) for k, v in large.items()},
    }
    lines = ["transport: raw aiokafka copy vs runtime pass-through (TLS+SCRAM, same broker)"]
    for name, f in (("1 KB", small), ("512 KB", large)):
        lines.append(
            f"  {name:>6}: raw {f['raw_msgs_per_s']:8.0f} msg/s {f['raw_mb_per_s']:7.1f} MB/s | "
            f"runtime {f['runtime_msgs_per_s']:8.0f} msg/s {f['runtime_mb_per_s']:7.1f} MB/s | "
            f"ratio {f['ratio']:.2f}  ({int(f['messages'])} messages)"
        )
    emit(figures, args.json, lines)


if __name__ == "__main__":
    asyncio.run(main())

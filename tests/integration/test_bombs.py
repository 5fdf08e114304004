"""Attack test on the real processes: decompression and parser bombs sent by a modality to the
gateway (its C-STORE path computes the Kafka key from the bytes) and on to ingest (which judges
them), both services as their own OS processes on the real broker. Each bomb is a dead letter
with its own reason; the peak RSS of both processes while they handle the bombs is printed and
bounded. Before the bounded readers, the 1 GiB deflate bomb alone cost ~2 GiB in each.

A PDU header announcing 1 GiB is cut off by the gateway before its body is read (pynetdicom
alone buffered whatever a peer streamed). A series past ingest's instance cap is refused as a whole (``series_too_large``) through real
Kafka transactions: its state is kept small and marked, never redone, never published.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from shared.dicom import phantom
from shared.schemas import DeadLetter, SeriesReady
from shared.stack.broker import free_port
from tests import bombs
from tests.helpers import Env, Reader, StageProcess, wait_until_sync

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BOUND = 96 * MiB  # peak RSS growth allowed to either process while it handles every bomb
AE_TITLE = "BOMBER"


@pytest.fixture
def stack(env: Env, tmp_path: Path) -> Iterator[tuple[StageProcess, StageProcess, int]]:
    """(ingest, gateway, gateway DICOM port), both as their own processes."""
    port = free_port()
    ingest = StageProcess(
        env.service_env(
            "ingest",
            RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S="600",
            RADSTREAM_INGEST__MAX_SERIES_INSTANCES="6",
        ),
        "services.ingest.main",
        tmp_path / "ingest.log",
    ).start()
    gateway = StageProcess(
        env.service_env(
            "gateway",
            RADSTREAM_GATEWAY__PORT=str(port),
            RADSTREAM_GATEWAY__ALLOWED_AE_TITLES=AE_TITLE,
            RADSTREAM_GATEWAY__PLAIN_DICOM="true",
        ),
        "services.gateway.main",
        tmp_path / "gateway.log",
    ).start()
    for proc in (ingest, gateway):
        wait_until_sync(proc.ready, 90, "service ready")
    yield ingest, gateway, port
    assert gateway.terminate() == 0
    assert ingest.terminate() == 0


def store(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file as its bytes are (an attacker's encoding is sent, not re-encoded):
    pynetdicom's chunked send reads the dataset from the file without decoding it."""
    ae = AE(ae_title=AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for ts in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90"):
        ae.add_requested_context(CTImageStorage, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADSTREAM")
    assert assoc.is_established, "the gateway refused the association"
    try:
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()
    return statuses


def pdu_bomb(port: int, limit: int) -> int:
    """Announce an A-ASSOCIATE-RQ of 1 GiB and stream zeros until the gateway hangs up (or
    ``limit`` bytes went); returns the bytes sent."""
    sent = 0
    chunk = bytes(1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))
        try:
            while sent < limit:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent


def mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


async def test_bombs_through_the_gateway_into_ingest_keep_both_flat(
    env: Env, stack: tuple[StageProcess, StageProcess, int], tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    ingest, gateway, port = stack
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    warm = phantom.chest_ct(tmp_path / "warm", seed=31, size=32, slices=3, nodules_mm=())
    series = phantom.chest_ct(tmp_path / "long", seed=32, size=16, slices=8, nodules_mm=())
    cases = {
        "deflate_1gib": (bombs.deflate_bomb(tmp_path), "inflated_too_large"),
        "million_items": (bombs.items_bomb(tmp_path), "too_many_items"),
        "j2k_lies": (bombs.j2k_bomb(tmp_path, honest=False), "codestream_mismatch"),
        "j2k_8192": (bombs.j2k_bomb(tmp_path, honest=True), "pixel_size_implausible"),
    }
    files = []
    for name, (data, _) in cases.items():
        (tmp_path / f"{name}.dcm").write_bytes(data)
        files.append(tmp_path / f"{name}.dcm")

    async with (
        Reader(env, "series", SeriesReady) as out,
        Reader(env, "deadletter", DeadLetter) as dlq,
    ):
        # warm both processes up on a real series (imports, clients, first transaction)
        assert await asyncio.to_thread(store, port, warm.files) == [0] * 3
        await out.wait_for(1, timeout=90)
        pids = {"ingest": ingest.proc.pid, "gateway": gateway.proc.pid}  # type: ignore[union-attr]
        before = {name: bombs.rss(pid) for name, pid in pids.items()}
        for pid in pids.values():
            bombs.reset_peak_rss(pid)

        statuses = await asyncio.to_thread(store, port, files)
        assert statuses == [0] * len(files)  # the gateway passes them on; ingest judges
        # one series past the instance cap (6): the 7th and 8th instance are refused
        assert await asyncio.to_thread(store, port, series.files) == [0] * 8
        await dlq.wait_for(len(cases) + 2, timeout=90)
        # a PDU header announcing 1 GiB, then 128 MiB streamed: the gateway hangs up at once
        streamed = await asyncio.to_thread(pdu_bomb, port, 128 * MiB)
        assert streamed < 32 * MiB, f"the gateway read {mib(streamed)} of a 1 GiB PDU"
        print(f"\nPDU bomb (1 GiB announced): the gateway hung up after {streamed} bytes sent")
        # and ingest carries on: a good series after the bombs is assembled
        after = phantom.chest_ct(tmp_path / "after", seed=33, size=32, slices=2, nodules_mm=())
        assert await asyncio.to_thread(store, port, after.files) == [0] * 2
        await out.wait_for(2, timeout=90)
        peaks = {name: bombs.peak_rss(pid) for name, pid in pids.items()}
        await dlq.drain(1.0)
        await out.drain(1.0)

    for name in pids:
        print(
            f"\n{name}: RSS {mib(before[name])} before the bombs, peak {mib(peaks[name])} "
            f"while handling them (+{mib(peaks[name] - before[name])}; bound +{mib(BOUND)})"
        )
    reasons = sorted(letter.reason for letter in dlq.records)
    expected = sorted([reason for _, reason in cases.values()] + ["series_too_large"] * 2)
    assert reasons == expected
    assert all(letter.stage == "ingest" for letter in dlq.records)
    assert [r.series_instance_uid for r in out.records] == [
        warm.series_instance_uid,
        after.series_instance_uid,
    ]  # the refused series is never published
    for name in pids:
        assert peaks[name] - before[name] < BOUND, f"{name} grew {mib(peaks[name] - before[name])}"

"""Ingest's series state while a series assembles: linear in its slices, not quadratic.

Runs ingest's core on 512² CT series of 64, 300 and 600 slices, one transaction per slice (the
slowest case: the runtime batches slices that arrive together), each transaction's state change
sealed for the changelog as the runtime does, and prints seconds per series and per slice:
validation, content digest, encrypted blob write, state. No broker (``benchmarks/ingest.py``
and ``benchmarks/e2e.py`` measure with one). The baseline, measured in the same run, is the
state handling before: the whole series state decoded from JSON and validated at every slice,
and encoded again with ``json.dumps``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, parse_args
from benchmarks.ingest import variants
from services.ingest import core as ingest_core
from services.ingest.core import IngestCore
from services.ingest.state import SeriesState, load
from shared.config import IngestSettings
from shared.dicom import phantom
from shared.runtime.stage import Context, Emit
from shared.runtime.state import PartitionState, changelog_aad, state_purpose
from shared.schemas import EndOfSeries, InstanceData, SeriesReady
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend

CHANGELOG = "bench.ingest.state"


@contextmanager
def before() -> Iterator[None]:
    """The state handling this benchmark compares against (decode and encode per slice)."""

    def get(state: PartitionState, key: bytes) -> SeriesState | None:
        raw = state.get(key)
        return None if raw is None else load(raw)

    def put(
        self: ingest_core.IngestCore,
        state: PartitionState,
        key: bytes,
        st: SeriesState,
        written: bool = True,
    ) -> None:
        if written:
            state.put(key, st.dump())
        self.timers.schedule(state, key, *self._due(st))

    saved = ingest_core._get, ingest_core.IngestCore._put
    ingest_core._get, ingest_core.IngestCore._put = get, put  # type: ignore[assignment]
    try:
        yield
    finally:
        ingest_core._get, ingest_core.IngestCore._put = saved  # type: ignore[assignment]


def assemble(home: Path, series: list[bytes], uid: str) -> float:
    """Seconds to hand ``series`` and its marker to a fresh ingest core (SeriesReady out)."""
    keyring = Keyring.generate()
    core = IngestCore(BlobStore(LocalDirBackend(home / "blobs"), keyring), IngestSettings())
    state = PartitionState()
    ctx = Context(CHANGELOG, 0, 0, keyring.keyed_hash(uid), 0, state, keyring)
    out = None
    t0 = time.perf_counter()
    for data in [*series, None]:
        if data is None:
            marker = EndOfSeries(
                source="bench", series_instance_uid=uid, expected_count=len(series)
            )
            out = core.on_marker(marker, ctx, time.time())
        else:
            core.on_instance(InstanceData(source="bench", data=data), ctx, time.time())
        core.sync()
        for key, value in state.pending():  # what the runtime's transaction sends
            if value is not None:
                keyring.seal(value, changelog_aad(CHANGELOG, key), state_purpose(CHANGELOG))
        state.commit()
    seconds = time.perf_counter() - t0
    assert isinstance(out, Emit) and isinstance(out.record, SeriesReady), "no SeriesReady"
    assert out.record.instance_count == len(series)
    return seconds


def main() -> None:
    args = parse_args(__doc__ or "")
    lengths = (64, 300) if args.quick else (64, 300, 600)
    figures: dict[str, Any] = {"transactions": "one per slice"}
    lines = ["ingest core, 512² CT, one transaction per slice (seconds per series):"]
    with tempfile.TemporaryDirectory(prefix="radstream-bench-") as tmp:
        home = Path(tmp)
        ph = phantom.chest_ct(home / "template", seed=1, size=512, slices=100, nodules_mm=())
        template = [f.read_bytes() for f in ph.files]
        copies = variants(
            template, ph.series_instance_uid, -(-max(lengths) // len(template)), same_series=True
        )
        slices = [d for copy in copies for d in copy]  # one series, new SOP UIDs per copy
        for n in lengths:
            series = slices[:n]
            best_now = best_before = float("inf")
            for run in range(2):  # best of two, alternating
                best_now = min(
                    best_now, assemble(home / f"now{n}-{run}", series, ph.series_instance_uid)
                )
                with before():
                    best_before = min(
                        best_before,
                        assemble(home / f"before{n}-{run}", series, ph.series_instance_uid),
                    )
            figures[f"seconds_{n}"] = round(best_now, 3)
            figures[f"seconds_{n}_before"] = round(best_before, 3)
            figures[f"ms_per_slice_{n}"] = round(1000 * best_now / n, 2)
            figures[f"ms_per_slice_{n}_before"] = round(1000 * best_before / n, 2)
            figures[f"speedup_{n}"] = round(best_before / best_now, 2)
            lines.append(
                f"  {n:4d} slices: {best_now:6.3f} s ({1000 * best_now / n:.2f} ms/slice); "
                f"before {best_before:6.3f} s ({1000 * best_before / n:.2f} ms/slice): "
                f"{best_before / best_now:.2f}x"
            )
    emit(figures, args.json, lines, args.json_out)


if __name__ == "__main__":
    main()

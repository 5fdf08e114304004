"""Transaction cadence of the runtime, without a broker: a transaction ends right after a
record whose output another stage waits for (``commit_on_output``); records that only change
state, are dead-lettered or audited keep batching; batches stay within their limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.errors import PoisonError
from shared.runtime.harness import InputRecord
from shared.runtime.ownership import OwnedPartition
from shared.runtime.stage import Context, Emit, StageRunner, StageSpec
from shared.runtime.state import PartitionState
from shared.schemas import AuditEvent, Probe, Reason
from shared.security.envelope import Keyring


def handler(probe: Probe, ctx: Context) -> Any:
    """seq % 4: 0 → output for the next stage, 1 → state only, 2 → audit only, 3 → poison."""
    assert ctx.state is not None
    kind = probe.seq % 4
    if kind == 0:
        return probe
    if kind == 1:
        ctx.state.put(b"k", probe.seq)
        return None
    if kind == 2:
        return Emit("audit", AuditEvent(actor="t", action="a", resource="r", outcome="success"))
    raise PoisonError(Reason.POISON, "probe marked as poison")


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


def runner(tmp_path: Path, keyring: Keyring, **overrides: Any) -> StageRunner[Probe]:
    spec = StageSpec(
        name="preprocess",
        input_topic="series",
        input_type=Probe,
        output_topic="volumes",
        handler=handler,
        stateful=True,
    )
    return StageRunner(spec, Settings(home=tmp_path, **overrides), keyring)


def records(keyring: Keyring, seqs: list[int], size: int = 0) -> list[InputRecord]:
    codec = Codec(keyring)
    out = []
    for i, seq in enumerate(seqs):
        value, headers = codec.encode(
            "radstream.series", b"k", Probe(id=f"p{seq}", seq=seq, payload=b"x" * size)
        )
        out.append(InputRecord("radstream.series", 0, i, b"k", value, headers, 0))
    return out


def part() -> OwnedPartition:
    from aiokafka import TopicPartition

    return OwnedPartition(TopicPartition("radstream.series", 0), None, PartitionState(), 0)  # type: ignore[arg-type]


def test_a_transaction_ends_after_the_first_record_with_output(
    tmp_path: Path, keyring: Keyring
) -> None:
    stage = runner(tmp_path, keyring)
    # state-only, audit, poison, state-only: all handled in one transaction; then the output
    batch = records(keyring, [1, 2, 3, 5, 4, 8, 9])
    handled = stage._handle(part(), batch)
    assert [len(o.outgoing) for o in handled] == [0, 1, 1, 0, 1]
    assert stage.dispatcher.feeds_next(handled[-1])
    assert not any(stage.dispatcher.feeds_next(o) for o in handled[:-1])
    # the rest is the next transaction
    assert len(stage._handle(part(), batch[len(handled) :])) == 1
    # the wait of every handled record was observed
    assert stage.metrics.input_wait_seconds.labels("preprocess")._sum.get() > 0


def test_without_commit_on_output_the_whole_chunk_is_one_transaction(
    tmp_path: Path, keyring: Keyring
) -> None:
    stage = runner(tmp_path, keyring, commit_on_output=False)
    assert len(stage._handle(part(), records(keyring, [1, 4, 8, 2]))) == 4


def test_chunks_respect_the_record_and_byte_limits(tmp_path: Path, keyring: Keyring) -> None:
    stage = runner(tmp_path, keyring, batch_max_records=5, batch_max_bytes=10_000)
    assert len(stage._chunk(records(keyring, list(range(10))))) == 5
    big = records(keyring, list(range(10)), size=4000)
    assert len(stage._chunk(big)) == 3  # the third record crosses 10 kB
    assert len(stage._chunk(records(keyring, [1], size=50_000))) == 1  # never empty

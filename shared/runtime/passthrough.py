"""A diagnostic pass-through stage: copies :class:`~shared.schemas.Probe` records from a stage's
input topic to its output topic through the full runtime (transactions, envelopes, validation,
dead letters). Used by the exactly-once kill tests, the transport benchmark and as a canary.

It runs as one of the stage principals (``RADSTREAM_PASSTHROUGH_AS``, default ``preprocess``),
so it has exactly that stage's ACLs: read ``series``, write ``volumes``.
Set ``RADSTREAM_PASSTHROUGH_DELAY_S`` to simulate slow, CPU-bound work off the event loop.
"""

from __future__ import annotations

import os
import sys
import time

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the imports below exits 0, as every service

from shared.runtime.errors import PoisonError  # noqa: E402
from shared.runtime.service import run_stage  # noqa: E402
from shared.runtime.stage import Context, StageSpec  # noqa: E402
from shared.schemas import Probe, Reason  # noqa: E402
from shared.stack.principals import STAGES  # noqa: E402


def make_spec(stage: str = "preprocess", delay_s: float = 0.0) -> StageSpec[Probe]:
    src, outs = STAGES[stage]

    def copy(probe: Probe, ctx: Context) -> Probe:
        if probe.poison:
            raise PoisonError(Reason.POISON, "probe marked as poison")
        if delay_s:
            time.sleep(delay_s)  # stands for CPU-bound work: runs in the handler thread pool
        return probe

    return StageSpec(
        name=stage, input_topic=src, input_type=Probe, output_topic=outs[0], handler=copy
    )


def main() -> int:
    stage = os.environ.get("RADSTREAM_PASSTHROUGH_AS", "preprocess")
    delay = float(os.environ.get("RADSTREAM_PASSTHROUGH_DELAY_S", "0"))
    return run_stage(make_spec(stage, delay))


if __name__ == "__main__":
    sys.exit(main())

"""Notify service: Alert → webhooks, FHIR servers and HL7 interface engines, per rule route
(``RADSTREAM_NOTIFY__TARGETS_FILE``); delivered targets per alert are its keyed state."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.notify.core import Breaker, NotifyCore, NotifyMetrics  # noqa: E402
from services.notify.targets import Targets  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.runtime.raised import RaisedAlerts  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import Alert  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.topology import stage  # noqa: E402

STAGE = stage("notify")


def build(
    settings: Settings,
    keyring: Keyring,
    registry: CollectorRegistry | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> StageSpec[Alert]:
    del keyring  # the runtime decrypts the alerts; delivery needs no key of ours
    c = settings.notify
    core = NotifyCore(
        Targets.load(c.targets_file),
        c.timeout_s,
        RaisedAlerts(c.delivered_retention_s),
        NotifyMetrics(registry) if registry is not None else None,
        clock=clock,
        breaker=Breaker(c.breaker_failures, c.breaker_cooldown_s),
    )
    return StageSpec(
        name=STAGE.name,
        input_topic=STAGE.input,
        input_type=Alert,
        output_topic=STAGE.output,
        handler=core.handle,
        stateful=STAGE.stateful,
        tick=core.tick,
        tick_interval_s=60.0,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())

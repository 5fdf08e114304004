"""Notify service: Alert → webhooks, FHIR servers and HL7 interface engines, per rule route
(``RADSTREAM_NOTIFY__TARGETS_FILE``); delivered targets per alert are its keyed state."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry

from services.alert.raised import RaisedAlerts
from services.notify.core import NotifyCore, NotifyMetrics
from services.notify.targets import Targets
from shared.config import Settings
from shared.runtime.service import serve
from shared.runtime.stage import StageSpec
from shared.schemas import Alert
from shared.security.envelope import Keyring
from shared.topology import stage

STAGE = stage("notify")


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[Alert]:
    del keyring  # the runtime decrypts the alerts; delivery needs no key of ours
    c = settings.notify
    core = NotifyCore(
        Targets.load(c.targets_file),
        c.timeout_s,
        RaisedAlerts(c.delivered_retention_s),
        NotifyMetrics(registry) if registry is not None else None,
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

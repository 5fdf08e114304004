"""Alert service: SegmentationDone → Alerts (declarative rules); nothing else on the way."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import sys  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.alert.core import AlertCore, AlertMetrics  # noqa: E402
from services.alert.rules import RuleSet  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.runtime.raised import RaisedAlerts  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import SegmentationDone  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.topology import stage  # noqa: E402

STAGE = stage("alert")


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[SegmentationDone]:
    core = AlertCore(
        RuleSet.load(settings.alert.rules_file),
        AlertMetrics(registry) if registry is not None else None,
        RaisedAlerts(settings.alert.raised_retention_s),
    )
    return StageSpec(
        name=STAGE.name,
        input_topic=STAGE.input,
        input_type=SegmentationDone,
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

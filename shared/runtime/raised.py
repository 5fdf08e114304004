"""The alert ids already published: the alert stage never publishes one twice (and notify
never delivers one twice).

Alert ids are deterministic (series, revision, finding, rule), so the same findings handled
again (a replay of ``findings``, a series analysed again, a redelivery after a rebalance or a
kill) give the same ids. The ids raised for a series are keyed state of the alert stage (key:
the input's key, the keyed hash of the series; value: :class:`RaisedIds`), written to the
compacted changelog ``alert.state`` in the same transaction as the alerts themselves, so an
id is recorded exactly when its alert is committed, and a restart or a new owner of the
partition restores exactly the ids that were published.

Retention: a series' ids are kept ``raised_retention_s`` (default 90 days) after its last
alert, then deleted by the stage's timer (only due keys are read, see
:class:`~shared.runtime.timers.KeyTimers`). It is longer than ingest's fingerprint retention
(30 days), so a series ingest has forgotten and analyses again at revision 1 still raises
nothing it raised before.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.runtime.state import PartitionState
from shared.runtime.timers import KeyTimers

log = logging.getLogger("radstream.alert")


class RaisedIds(BaseModel):
    """The changelog value of one series: its alert ids and when each was raised."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="layout of this record")
    ids: dict[str, float] = Field(default_factory=dict, description="alert id → epoch s raised")
    last_update: float = Field(description="epoch s of the last alert raised (retention)")


def _load(raw: Any) -> RaisedIds | None:
    try:
        return None if raw is None else RaisedIds.model_validate(raw)
    except ValidationError:
        return None


class RaisedAlerts:
    """Admission of alert ids against the series' raised ids, and their retention."""

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self.timers = KeyTimers(self._due_of)

    def _due_of(self, key: bytes, state: PartitionState) -> tuple[float, str] | None:
        ids = _load(state.get(key))
        return None if ids is None else (ids.last_update + self.retention_s, "")

    def admit(
        self, state: PartitionState, key: bytes, alert_ids: list[str], now: float
    ) -> set[str]:
        """The ids of ``alert_ids`` never raised for this series; they are recorded as raised
        (pending with the handler's transaction). A record this stage cannot read is replaced:
        a page twice is better than a critical finding never paged."""
        raw = state.get(key)
        ids = _load(raw)
        if ids is None:
            if raw is not None:
                log.warning("alert: unreadable raised-ids record replaced (series key kept)")
            ids = RaisedIds(last_update=now)
        new = {a for a in alert_ids if a not in ids.ids}
        if new:
            ids.ids.update(dict.fromkeys(new, now))
            ids.last_update = now
            state.put(key, ids.model_dump(mode="json"))
            self.timers.schedule(state, key, now + self.retention_s)
        return new

    def expire(self, state: PartitionState, now: float) -> int:
        """Delete the series whose last alert is older than the retention; returns how many."""
        gone = 0
        for key in self.timers.due(state, now):
            ids = _load(state.get(key))
            if ids is None:
                self.timers.forget(state, key)
            elif now - ids.last_update >= self.retention_s:
                state.delete(key)
                self.timers.forget(state, key)
                gone += 1
            else:
                self.timers.schedule(state, key, ids.last_update + self.retention_s)
        return gone

"""Notify's core: Alert → deliveries to the targets its rule's routes name.

Delivery is at least once, keyed by the alert id:

* each target an alert reaches is recorded in the stage's keyed state (key: keyed hash of the
  alert id; value: target → when), written to the changelog in the same transaction that
  commits the alert's offset: an alert consumed again after that (a replay, a duplicate record,
  a restart) is not sent again to a target that has it;
* a crash between the send and the commit re-sends it; the receiver sees the same
  idempotency key (webhook ``Idempotency-Key``, FHIR conditional create on the alert id, HL7
  control id derived from it) and drops the repeat;
* a failed attempt raises :class:`RetriableError`: the runtime retries with backoff. Targets
  that already took the alert in an earlier attempt are not sent to again (remembered in
  :class:`Attempts` until the alert is done). After the last attempt the alert is
  dead-lettered: ``notification_failed`` (the endpoint kept failing) or
  ``notification_rejected`` (it refused for good: HTTP 4xx, HL7 AR, an invalid resource);
* a target that made several alerts in a row give up is skipped for a cool-down
  (:class:`Breaker`): its alerts are dead-lettered at once rather than retried, so the alerts
  behind them on the partition are not held up by an endpoint that is down.

Every target is tried on every attempt, so one endpoint that is down never keeps the alert
from the others. Logs, metrics, audit events and dead letters name the channel and the
target, never the alert's content.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hl7apy.exceptions import HL7apyException
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from services.notify import fhir, hl7, webhook
from services.notify.targets import FhirTarget, Hl7Target, Target, Targets, WebhookTarget
from services.notify.transport import DeliveryFailed
from shared.runtime.errors import PoisonError, RetriableError
from shared.runtime.raised import RaisedAlerts
from shared.runtime.stage import Context, Emit, HandlerResult
from shared.schemas import Alert, AuditEvent
from shared.schemas.reasons import Reason

CHANNELS = ("webhook", "fhir", "hl7")
OUTCOMES = ("delivered", "failed", "rejected", "duplicate", "circuit_open")


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "radstream_notifications",
            "Notification attempts by channel and outcome: delivered, failed (retried or "
            "dead-lettered), rejected (refused for good), duplicate (delivered before), "
            "circuit_open (the target kept failing: not contacted, dead-lettered at once)",
            ["channel", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "radstream_notification_seconds",
            "Time of one delivery attempt (connect, send, answer)",
            ["channel"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        for channel in CHANNELS:  # every series exists from the start (rate() sees the 1st)
            self.seconds.labels(channel)
            for outcome in OUTCOMES:
                self.notifications.labels(channel, outcome)


class Attempts:
    """What earlier attempts at an alert achieved, per target, until the alert is done: a
    target that took it is not sent to again on a retry; one that refused it for good is not
    asked again. Bounded; guarded for the stage's handler threads."""

    def __init__(self, capacity: int = 10000) -> None:
        self._seen: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def get(self, alert_id: str, target: str) -> tuple[bool, str | None]:
        """(known, rejection message or None for delivered)."""
        with self._lock:
            key = (alert_id, target)
            return (key in self._seen, self._seen.get(key))

    def put(self, alert_id: str, target: str, rejected: str | None) -> None:
        with self._lock:
            self._seen[(alert_id, target)] = rejected
            self._seen.move_to_end((alert_id, target))
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def done(self, alert_id: str) -> None:
        """The alert's attempts are over: forget its refusals (a later replay asks again).
        Its deliveries stay (bounded): if the transaction that records them aborts and the
        alert is handled again, they are still not re-sent from this process."""
        with self._lock:
            for key in [k for k, v in self._seen.items() if k[0] == alert_id and v is not None]:
                del self._seen[key]


class Breaker:
    """A circuit breaker per target: after ``failures`` alerts in a row gave up on a target
    (every retry failed), the target is not contacted for ``cooldown_s``; its alerts are
    dead-lettered at once instead of retried, so one endpoint that is down does not hold up
    the alerts behind it on the partition for the whole retry schedule. After the cool-down
    the next alert tries it again: a delivery closes the circuit, a give-up opens it again.
    ``failures`` 0 disables it. Guarded for the stage's handler threads."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._gave_up: dict[str, int] = {}
        self._open_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def closed(self, target: str, now: float) -> bool:
        with self._lock:
            return now >= self._open_until.get(target, 0.0)

    def gave_up(self, target: str, now: float) -> None:
        with self._lock:
            count = self._gave_up.get(target, 0) + 1
            self._gave_up[target] = count
            if self.failures and count >= self.failures:
                self._open_until[target] = now + self.cooldown_s

    def delivered(self, target: str) -> None:
        with self._lock:
            self._gave_up.pop(target, None)
            self._open_until.pop(target, None)


@dataclass
class NotifyCore:
    targets: Targets
    timeout_s: float
    delivered: RaisedAlerts  # the ledger of delivered targets per alert (keyed state)
    metrics: NotifyMetrics | None = None
    clock: Callable[[], float] = time.time
    attempts: Attempts = field(default_factory=Attempts)
    breaker: Breaker = field(default_factory=lambda: Breaker(3, 60.0))

    def _send(self, target: Target, alert: Alert) -> None:
        """One attempt at one target; raises DeliveryFailed."""
        try:
            if isinstance(target, WebhookTarget):
                webhook.deliver(target, alert, timeout_s=self.timeout_s, now=self.clock())
            elif isinstance(target, FhirTarget):
                fhir.deliver(target, alert, timeout_s=self.timeout_s)
            elif isinstance(target, Hl7Target):
                hl7.deliver(target, alert, timeout_s=self.timeout_s)
        except ValidationError as exc:  # never str(exc): it quotes the values
            raise DeliveryFailed(
                False, f"FHIR resources do not validate ({exc.error_count()} errors)"
            ) from None
        except HL7apyException as exc:
            raise DeliveryFailed(
                False, f"ORU^R01 does not validate ({type(exc).__name__})"
            ) from None

    def _count(self, channel: str, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.notifications.labels(channel, outcome).inc()
            if seconds is not None:
                self.metrics.seconds.labels(channel).observe(seconds)

    @staticmethod
    def _audit(label: str, key: bytes) -> Emit:
        """A delivery, audited: the target and the keyed hash of the alert, no content."""
        event = AuditEvent(
            actor="notify",
            action="notification_delivered",
            resource=f"{label}/{key.decode()}"[:256],
            outcome="success",
        )
        return Emit("audit", event)

    def handle(self, alert: Alert, ctx: Context) -> HandlerResult:
        targets = self.targets.for_alert(alert)
        if not targets:
            return None
        key = ctx.key_for(f"notify|{alert.alert_id}")
        now = self.clock()
        audits: list[Emit] = []
        failed: list[str] = []  # retriable failures of this attempt
        failing: list[str] = []  # their targets
        broken: list[str] = []  # targets whose circuit is open: not contacted, not retried
        rejected: list[str] = []
        for target in targets:
            label = f"{target.channel}:{target.name}"
            if ctx.state is not None and not self.delivered.admit(
                ctx.state, key, [target.name], now
            ):
                self._count(target.channel, "duplicate")  # delivered before: not again
                continue
            known, refusal = self.attempts.get(alert.alert_id, target.name)
            if known and refusal is not None:
                rejected.append(refusal)  # refused for good in an earlier attempt
                continue
            if known:  # delivered in an earlier attempt: recorded above, not re-sent
                audits.append(self._audit(label, key))
                continue
            if not self.breaker.closed(target.name, now):
                self._count(target.channel, "circuit_open")
                broken.append(f"{label}: circuit open (gave up on its last alerts)")
                continue
            started = time.perf_counter()
            try:
                self._send(target, alert)
            except DeliveryFailed as exc:
                elapsed = time.perf_counter() - started
                if exc.retriable:
                    self._count(target.channel, "failed", elapsed)
                    failed.append(f"{label}: {exc.message}")
                    failing.append(target.name)
                else:
                    self._count(target.channel, "rejected", elapsed)
                    self.attempts.put(alert.alert_id, target.name, f"{label}: {exc.message}")
                    rejected.append(f"{label}: {exc.message}")
                continue
            self._count(target.channel, "delivered", time.perf_counter() - started)
            self.breaker.delivered(target.name)
            self.attempts.put(alert.alert_id, target.name, None)
            audits.append(self._audit(label, key))
        if failed and not ctx.last_attempt:
            raise RetriableError("; ".join(failed + broken + rejected))
        self.attempts.done(alert.alert_id)
        for name in failing:  # every retry failed: one more give-up for the breaker
            self.breaker.gave_up(name, self.clock())
        if failed or broken:
            raise PoisonError(
                Reason.NOTIFICATION_FAILED,
                f"after {ctx.attempt} attempts: " + "; ".join(failed + broken + rejected),
            )
        if rejected:
            raise PoisonError(Reason.NOTIFICATION_REJECTED, "; ".join(rejected))
        return audits

    def tick(self, ctx: Context, now: float) -> HandlerResult:
        """Forget the delivered targets of alerts older than the retention."""
        if ctx.state is not None:
            self.delivered.expire(ctx.state, now)
        return None

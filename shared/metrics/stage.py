"""Metrics every stage exports. Names follow Prometheus conventions; label values are bounded
(stage names, outcomes, :class:`~shared.schemas.reasons.Reason` codes, partition numbers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.schemas.reasons import Reason

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


def deadletter_counter(registry: CollectorRegistry) -> Counter:
    """``radstream_deadletters_total{stage, reason}``: the stages' and the gateway's refused
    records, one series family for the RadStreamDeadLetters alert and the dashboard."""
    return Counter(
        "radstream_deadletters",
        "Records sent to the dead-letter topic, by reason code",
        ["stage", "reason"],
        registry=registry,
    )


class StageMetrics:
    def __init__(self, registry: CollectorRegistry, stage: str) -> None:
        self.stage = stage
        self.messages = Counter(
            "radstream_messages",
            "Input records handled, by outcome (ok, deadletter)",
            ["stage", "outcome"],
            registry=registry,
        )
        self.outputs = Counter(
            "radstream_output_records",
            "Records produced to output topics",
            ["stage"],
            registry=registry,
        )
        self.retries = Counter(
            "radstream_retries",
            "Handler retries after a retriable error",
            ["stage"],
            registry=registry,
        )
        self.deadletters = deadletter_counter(registry)
        self.tick_errors = Counter(
            "radstream_tick_errors",
            "Timer (tick) runs that raised; their state writes were rolled back",
            ["stage"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "radstream_handler_seconds",
            "Time spent in the stage handler per record",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.transaction_seconds = Histogram(
            "radstream_transaction_seconds",
            "Batch handling started → committed (handlers, outputs, commit)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "radstream_commit_seconds",
            "Handler done → transaction committed (outputs, offsets, commit round trips)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.input_wait_seconds = Histogram(
            "radstream_input_wait_seconds",
            "Input record sent upstream → its handler starts here (the upstream's commit, "
            "broker visibility, the fetch, queueing behind earlier records)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.transactions = Counter(
            "radstream_transactions",
            "Kafka transactions by outcome (committed, aborted, fenced)",
            ["stage", "outcome"],
            registry=registry,
        )
        self.lag = Gauge(
            "radstream_consumer_lag_messages",
            "Records behind the end of the input partition (last fetch)",
            ["stage", "partition"],
            registry=registry,
        )
        self.input_bytes = Counter(
            "radstream_input_bytes", "Bytes of input records consumed", ["stage"], registry=registry
        )
        self.rebalances = Counter(
            "radstream_rebalance_events",
            "Partition assignment changes seen by this instance (assigned, revoked)",
            ["stage", "event"],
            registry=registry,
        )
        self.assigned = Gauge(
            "radstream_assigned_partitions",
            "Input partitions this instance owns",
            ["stage"],
            registry=registry,
        )

    def dead_letter(self, reason: Reason) -> None:
        """Count one dead letter; the label is a :class:`Reason` member, never free text."""
        self.deadletters.labels(self.stage, Reason(reason).value).inc()
        self.messages.labels(self.stage, "deadletter").inc()

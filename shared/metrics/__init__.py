"""Prometheus metrics (injected registry) and the /metrics, /healthz, /readyz endpoint."""

from shared.metrics.http import HealthServer
from shared.metrics.stage import StageMetrics

__all__ = ["HealthServer", "StageMetrics"]

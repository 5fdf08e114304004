"""Prometheus metrics (injected registry) and the /metrics, /healthz, /readyz endpoint."""

from shared.metrics.stage import StageMetrics
from shared.metrics.http import HealthServer

__all__ = ["HealthServer", "StageMetrics"]

"""Errors as data: a handler raises one of these, the runtime decides what happens."""

from __future__ import annotations


class StageError(Exception):
    """Base of the runtime's typed errors."""


class RetriableError(StageError):
    """Transient trouble (a dependency is down, a timeout): retried with bounded backoff,
    then dead-lettered with reason ``retries_exhausted``."""


class PoisonError(StageError):
    """This input can never be handled: dead-lettered at once with ``reason``.

    ``message`` must not contain PHI: it is written to the dead-letter topic and logs.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

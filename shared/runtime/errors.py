"""Errors as data: a handler raises one of these, the runtime decides what happens."""

from __future__ import annotations

from shared.schemas.reasons import Reason


class StageError(Exception):
    """Base of the runtime's typed errors."""


class RetriableError(StageError):
    """Transient trouble (a dependency is down, a timeout): retried with bounded backoff,
    then dead-lettered with reason ``retries_exhausted``."""


class PoisonError(StageError):
    """This input can never be handled: dead-lettered at once with ``reason``.

    ``reason`` is a :class:`~shared.schemas.reasons.Reason` or its string value; any other
    string raises ``ValueError`` here (the runtime then dead-letters the input as
    ``handler_error``), so a label or a dead letter never carries free text.
    ``message`` must not contain PHI: it is written to the dead-letter topic and logs.

    The handler's state writes for the record are rolled back, unless ``keep_state``: a
    handler that refuses a record *and* records the refusal (ingest marking a series too large
    so that its later instances are refused too) keeps what it wrote.
    """

    def __init__(self, reason: Reason | str, message: str, *, keep_state: bool = False) -> None:
        self.reason = Reason(reason)
        self.message = message
        self.keep_state = keep_state
        super().__init__(f"{self.reason}: {message}")

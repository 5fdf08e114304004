"""One Kafka transaction as an async context manager::

    async with transaction(producer) as txn:
        await txn.send(outgoing)
        await txn.send_offsets({tp: next_offset}, group)
    # committed here; nothing of it is visible if the block or the commit failed

Leaving the block normally waits for every send, then commits. Whatever goes wrong surfaces as
one of three outcomes, so the caller knows exactly what the broker holds:

* :class:`Fenced`: another producer with our transactional id fenced us; the partition is
  someone else's now (its new owner's ``init_transactions`` aborted our transaction).
* :class:`Aborted`: the commit was never requested and the transaction is rolled back (or left
  open for the next ``init_transactions`` to abort, when the abort itself failed:
  ``producer_usable`` is then False and the producer must be replaced). The committed offsets
  are the ones before this transaction.
* :class:`Uncertain`: the commit was requested and failed; the broker may have committed it.
  Re-initialise the producer (which completes or aborts it) and re-read the committed offset
  and state before going on.

A cancellation (``BaseException``) is not caught: the transaction stays open and the next
``init_transactions`` of this transactional id aborts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState

from shared.runtime.dispatch import Outgoing


class TransactionError(Exception):
    """The transaction did not commit (see the subclasses for what the broker holds)."""


class Fenced(TransactionError):
    """Our transactional id belongs to a newer producer: we lost the partition."""


class Aborted(TransactionError):
    """Rolled back before the commit was requested; the previous offsets stand."""

    def __init__(self, cause: BaseException, *, producer_usable: bool) -> None:
        super().__init__(f"transaction aborted ({type(cause).__name__})")
        self.producer_usable = producer_usable


class Uncertain(TransactionError):
    """The commit failed after it was requested: the outcome is unknown until the producer is
    re-initialised."""


class Transaction:
    """The open transaction of one producer: sends records and offsets into it."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._pending: list[asyncio.Future[object]] = []

    async def send(self, out: Outgoing) -> None:
        self._pending.append(
            await self._producer.send(
                out.topic,
                value=out.value,
                key=out.key,
                headers=out.headers,
                partition=out.partition,
            )
        )

    async def send_offsets(self, offsets: dict[TopicPartition, int], group: str) -> None:
        """Commit ``offsets`` of ``group`` with this transaction (exactly once)."""
        await self._producer.send_offsets_to_transaction(offsets, group)

    async def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


@asynccontextmanager
async def transaction(producer: AIOKafkaProducer) -> AsyncIterator[Transaction]:
    txn = Transaction(producer)
    try:
        await producer.begin_transaction()
        yield txn
        await txn._flush()
    except ProducerFenced as exc:
        raise Fenced(type(exc).__name__) from exc
    except KafkaError as exc:
        raise Aborted(exc, producer_usable=await _abort(producer)) from exc
    except Exception:
        # not the broker's doing (a bug in the block): roll back, then let it surface
        await _abort(producer)
        raise
    try:
        await producer.commit_transaction()
    except ProducerFenced as exc:
        raise Fenced(type(exc).__name__) from exc
    except KafkaError as exc:
        raise Uncertain(type(exc).__name__) from exc


async def _abort(producer: AIOKafkaProducer) -> bool:
    """Abort the open transaction; False if the producer cannot be used any more (then the
    next ``init_transactions`` of the transactional id aborts what is left)."""
    txn_manager = producer._txn_manager
    if txn_manager is None or txn_manager.is_fatal_error():
        return False
    if txn_manager.state not in (TransactionState.IN_TRANSACTION, TransactionState.ABORTABLE_ERROR):
        return False  # begin_transaction itself failed: nothing to abort, producer suspect
    try:
        await producer.abort_transaction()
    except KafkaError:
        return False
    return True

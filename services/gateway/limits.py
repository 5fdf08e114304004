"""What one DICOM peer may cost the gateway, as pure objects (a clock is passed in).

* :class:`AddressList`: peers allowed by address (single IPs or CIDR networks).
* :class:`PeerLimiter`: token buckets per peer address (associations per minute, instances
  per second); the table of peers is bounded (least recently seen evicted).
* :class:`PduBudget`: the PDU framing a peer sends, judged from each PDU's 6-byte header
  before its body is read: a PDU longer than the cap, or a dataset whose P-DATA bytes pass the
  dataset cap, ends the association (pynetdicom itself reads any PDU length it is told into
  memory, and accumulates a dataset without bound).
"""

from __future__ import annotations

import ipaddress
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

P_DATA_TF = 0x04
HEADER = 6


class AddressList:
    """Comma-separated IPs and networks (``10.1.0.0/16, 192.168.1.7``); empty allows any."""

    def __init__(self, text: str) -> None:
        self.networks = [
            ipaddress.ip_network(part.strip(), strict=False)
            for part in text.split(",")
            if part.strip()
        ]

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    at: float = 0.0

    def take(self, now: float, n: float = 1.0) -> bool:
        if self.tokens < 0:  # first use: full
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class PeerLimiter:
    """One bucket per peer address for each kind of request; thread-safe (pynetdicom calls
    from one thread per association)."""

    def __init__(
        self,
        associations_per_minute: float,
        instances_per_second: float,
        max_peers: int = 4096,
    ) -> None:
        self.associations_per_minute = associations_per_minute
        self.instances_per_second = instances_per_second
        self.max_peers = max_peers
        self._peers: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self._lock = threading.Lock()

    def _buckets(self, peer: str) -> tuple[TokenBucket, TokenBucket]:
        found = self._peers.get(peer)
        if found is None:
            per_s = self.associations_per_minute / 60.0
            found = (
                TokenBucket(per_s, max(1.0, self.associations_per_minute)),
                TokenBucket(self.instances_per_second, max(1.0, self.instances_per_second)),
            )
            self._peers[peer] = found
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        return found

    def association(self, peer: str, now: float) -> bool:
        """May ``peer`` open one more association now?"""
        if self.associations_per_minute <= 0:
            return True
        with self._lock:
            return self._buckets(peer)[0].take(now)

    def instance(self, peer: str, now: float) -> bool:
        """May ``peer`` store one more instance now?"""
        if self.instances_per_second <= 0:
            return True
        with self._lock:
            return self._buckets(peer)[1].take(now)


class BudgetExceeded(OSError):
    """The peer sent more than it may; raised from the socket read (pynetdicom then treats
    the connection as closed and aborts the association)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class PduBudget:
    """Follows the PDU stream of one association: :meth:`header` sees each PDU header before
    its body is read; :meth:`stored` resets the dataset count once a C-STORE was handled."""

    def __init__(self, max_pdu_bytes: int, max_dataset_bytes: int) -> None:
        self.max_pdu_bytes = max_pdu_bytes
        self.max_dataset_bytes = max_dataset_bytes
        self.pending = 0  # P-DATA bytes since the last handled request
        self.exceeded: str | None = None  # which cap ended the association
        self.refused: str | None = None  # refused at connection: not one PDU is read

    def refuse(self, why: str) -> None:
        self.refused = why

    def header(self, head: bytes | bytearray) -> None:
        if self.refused is not None:
            raise BudgetExceeded(self.refused)
        if len(head) != HEADER:
            return  # a short read: pynetdicom closes the connection itself
        pdu_type, _, length = struct.unpack(">BBL", head)
        if length > self.max_pdu_bytes:
            self.exceeded = "pdu_too_large"
        elif pdu_type == P_DATA_TF:
            self.pending += length
            if self.pending > self.max_dataset_bytes:
                self.exceeded = "dataset_too_large"
        if self.exceeded is not None:
            raise BudgetExceeded(self.exceeded)

    def stored(self) -> None:
        self.pending = 0

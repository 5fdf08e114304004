"""Attack tests on the DICOM gateway (issue 14, high): the gateway runs in this process with a
stand-in publisher (no broker), Debian's dcmtk (echoscu, storescu) or a raw socket is the peer.

* Outside the local demo the gateway refuses to start without mutual TLS; with it, a peer
  without a client certificate, with one from another CA, or without TLS is refused.
* Address allow-list with networks; associations per minute and C-STOREs per second per peer.
* A PDU header announcing more than the PDU cap, or a dataset past the dataset cap, ends the
  association before the body is read (before: pynetdicom read any announced length).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file

from services.gateway.core import Gateway, GatewayConfigError, GatewayMetrics, check_settings
from services.gateway.limits import AddressList, PduBudget, PeerLimiter, TokenBucket
from shared.config import GatewaySettings
from shared.ingress.publisher import Published
from shared.stack.broker import free_port
from tests.tls import CLIENT, SERVER, make_pki

AET = "STORESCU"


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: 'make setup' installs Debian's dcmtk"
    return path


@dataclass
class FakePublisher:
    """Records what the gateway would publish."""

    sent: list[bytes] = field(default_factory=list)

    async def publish(self, data: bytes) -> Published:
        self.sent.append(data)
        return Published(None, b"k", len(data))

    async def end_series(self, series_instance_uid: str, count: int) -> None:
        del series_instance_uid, count


@dataclass
class Running:
    gateway: Gateway
    publisher: FakePublisher
    registry: CollectorRegistry
    port: int

    def metric(self, name: str, outcome: str) -> float:
        value = self.registry.get_sample_value(
            f"radstream_gateway_{name}_total", {"outcome": outcome}
        )
        return float(value or 0.0)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    thread = threading.Thread(target=lp.run_forever, daemon=True)
    thread.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    thread.join(10)
    lp.close()


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(clock: Any = None, **kw: Any) -> Running:
        kw.setdefault("allowed_ae_titles", f"{AET},ECHOSCU")
        port = free_port()
        settings = GatewaySettings(port=port, ack_timeout_s=10, **kw)
        registry = CollectorRegistry()
        pub = FakePublisher()
        gw = Gateway(settings, pub, loop, GatewayMetrics(registry), clock=clock)  # type: ignore[arg-type]
        gw.start()
        started.append(gw)
        return Running(gw, pub, registry, port)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gateway's certificate (127.0.0.1), a modality's client certificate from the same CA
    and a rogue one from another CA."""
    return make_pki(
        tmp_path_factory.mktemp("pki"),
        {"gateway": ("ca", SERVER), "modality": ("ca", CLIENT), "rogue": ("rogue-ca", CLIENT)},
    )


def echo(port: int, *tls: str, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("echoscu"), "-aet", aet, "-aec", "RADSTREAM", "-to", "5", "-ta", "5", "-td", "5"]
    cmd += [*tls, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def store(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("storescu"), "-aet", AET, "-aec", "RADSTREAM", "-to", "5", "-ta", "5"]
    cmd += ["-td", "10", *tls, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def ct_file(tmp: Path, name: str, side: int = 128) -> Path:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm", download=False)))
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_gateway_refuses_to_start_without_mutual_tls_outside_the_demo(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    listens = {"allowed_ae_titles": "MODALITY"}
    with pytest.raises(GatewayConfigError):
        check_settings(GatewaySettings(**listens))  # the default: no certificate, no demo flag
    with pytest.raises(GatewayConfigError):  # TLS, but no client CA
        check_settings(GatewaySettings(tls_cert=cert, tls_key=cert, **listens))
    check_settings(GatewaySettings(tls_cert=cert, tls_key=cert, tls_ca=cert, **listens))
    check_settings(GatewaySettings(plain_dicom=True, **listens))  # the local demo, explicitly
    check_settings(GatewaySettings())  # no AE title allowed: no DIMSE listener (STOW-RS only)


def test_mutual_tls_refuses_peers_without_a_certificate_from_the_ca(
    serve: Any, pki: dict[str, Path], tmp_path: Path
) -> None:
    gw = serve(tls_cert=pki["gateway_pem"], tls_key=pki["gateway_key"], tls_ca=pki["ca_pem"])
    trust = ("+cf", str(pki["ca_pem"]))
    modality = ("+tls", str(pki["modality_key"]), str(pki["modality_pem"]), *trust)
    assert echo(gw.port, *modality).returncode == 0
    attacks = {
        "no TLS": (),
        "TLS without a client certificate": ("+tla", *trust),
        "a certificate from another CA": (
            "+tls", str(pki["rogue_key"]), str(pki["rogue_pem"]), *trust,
        ),
    }  # fmt: skip
    for what, args in attacks.items():
        assert echo(gw.port, *args).returncode != 0, f"{what}: the gateway answered"
    stored = store(gw.port, [ct_file(tmp_path, "a.dcm")], *modality)
    assert stored.returncode == 0, stored.stderr
    assert len(gw.publisher.sent) == 1
    refused = store(gw.port, [ct_file(tmp_path, "b.dcm")], "+tla", *trust)
    assert refused.returncode != 0 and len(gw.publisher.sent) == 1


def test_a_silent_tls_peer_does_not_stop_the_gateway_accepting_others(
    serve: Any, pki: dict[str, Path]
) -> None:
    gw = serve(tls_cert=pki["gateway_pem"], tls_key=pki["gateway_key"], tls_ca=pki["ca_pem"])
    modality = (
        "+tls",
        str(pki["modality_key"]),
        str(pki["modality_pem"]),
        "+cf",
        str(pki["ca_pem"]),
    )
    silent = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(3)]
    try:  # three connections that never say hello: the handshake waits in their threads
        assert echo(gw.port, *modality).returncode == 0
    finally:
        for s in silent:
            s.close()


def test_the_address_allow_list_takes_networks(serve: Any) -> None:
    outside = serve(plain_dicom=True, allowed_addresses="10.0.0.0/8, 192.168.7.1")
    assert echo(outside.port).returncode != 0
    assert outside.metric("associations", "refused_address") == 1
    inside = serve(plain_dicom=True, allowed_addresses="10.0.0.0/8,127.0.0.0/8")
    assert echo(inside.port).returncode == 0


def test_a_pdu_announcing_a_gigabyte_ends_the_association_before_its_body_is_read(
    serve: Any,
) -> None:
    gw = serve(plain_dicom=True, max_pdu_bytes=64 * 1024)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))  # A-ASSOCIATE-RQ, 1 GiB
        sent, closed = 0, False
        chunk = bytes(64 * 1024)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sent < (256 << 20):
            try:
                s.sendall(chunk)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        if not closed:
            try:
                closed = s.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed = True
    assert closed, f"the gateway kept reading ({sent} bytes sent)"
    assert sent < (64 << 20), f"{sent} bytes went in before the gateway hung up"
    wait_for(lambda: gw.metric("associations", "pdu_too_large") == 1)


def test_a_dataset_past_the_cap_is_refused_and_nothing_is_published(
    serve: Any, tmp_path: Path
) -> None:
    gw = serve(plain_dicom=True, max_dataset_bytes=1024 * 1024)
    big = ct_file(tmp_path, "big.dcm", side=1024)  # 2 MiB of pixels
    assert store(gw.port, [big]).returncode != 0 or not gw.publisher.sent
    assert gw.publisher.sent == []
    wait_for(lambda: gw.metric("associations", "dataset_too_large") == 1)
    small = [ct_file(tmp_path, f"s{i}.dcm", side=256) for i in range(3)]  # 128 KiB each
    assert store(gw.port, small).returncode == 0  # the cap is per dataset, not per association
    assert len(gw.publisher.sent) == 3


def test_per_peer_rate_limits(serve: Any, tmp_path: Path) -> None:
    now = [1000.0]
    gw = serve(
        clock=lambda: now[0],
        plain_dicom=True,
        peer_associations_per_minute=3,
        peer_instances_per_second=2,
    )
    files = [ct_file(tmp_path, f"r{i}.dcm") for i in range(4)]
    store(gw.port, files)  # one association, four C-STOREs in the same instant
    assert len(gw.publisher.sent) == 2  # the third is answered 0xA700 (storescu stops there)
    assert gw.metric("instances", "rate_limited") >= 1
    assert [echo(gw.port).returncode == 0 for _ in range(3)] == [True, True, False]
    assert gw.metric("associations", "rate_limited") == 1
    now[0] += 60.0  # a minute later the peer may come back
    assert echo(gw.port).returncode == 0


def test_limits_pure() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(1.0) and not bucket.take(1.0)
    limiter = PeerLimiter(60, 0, max_peers=2)
    assert limiter.instance("a", 0.0)  # 0: no limit
    for peer in ("a", "b", "c"):
        assert limiter.association(peer, 0.0)
    assert len(limiter._peers) == 2  # bounded table
    allowed = AddressList("10.0.0.0/8, ::1")
    assert allowed.allows("10.2.3.4") and allowed.allows("::ffff:10.0.0.1")
    assert not allowed.allows("11.0.0.1") and not allowed.allows("not-an-ip")
    budget = PduBudget(max_pdu_bytes=100, max_dataset_bytes=150)
    budget.header(struct.pack(">BBL", 4, 0, 100))
    with pytest.raises(OSError):
        budget.header(struct.pack(">BBL", 4, 0, 100))
    assert budget.exceeded == "dataset_too_large"


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)

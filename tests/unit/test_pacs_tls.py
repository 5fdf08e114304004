"""Attack tests (issue 14, medium): SEGs reached the PACS without TLS. The results stage's PACS
delivery now runs over DICOM TLS when configured, verifying the PACS (its CA and host name),
with a client certificate for a PACS that wants mutual TLS; it never falls back to plain DICOM
(a man in the middle without the PACS' certificate, or a plain listener, gets nothing); a PACS
beyond loopback without TLS is refused at start unless explicitly allowed. The PACS here is a
pynetdicom storage SCP in this process."""

from __future__ import annotations

import io
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from shared.dicom.pacs import PacsConfigError, configured, deliver
from shared.runtime.errors import RetriableError
from shared.stack.broker import free_port
from tests.tls import CLIENT, SERVER, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(
        tmp_path_factory.mktemp("pki"),
        {
            "pacs": ("ca", SERVER),
            "results": ("ca", CLIENT),
            "impostor": ("rogue-ca", SERVER),
        },
    )


def seg_bytes() -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def scp() -> Iterator[Any]:
    servers: list[Any] = []

    def start(tls: ssl.SSLContext | None) -> tuple[int, list[str]]:
        received: list[str] = []

        def on_store(event: Any) -> int:
            received.append(str(event.dataset.SOPInstanceUID))
            return 0x0000

        def on_find(event: Any) -> Iterator[tuple[int, None]]:
            yield 0x0000, None  # holds nothing yet

        ae = AE(ae_title="PACS")
        ae.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        port = free_port()
        servers.append(
            ae.start_server(
                ("127.0.0.1", port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)],
                ssl_context=tls,
            )
        )
        return port, received

    yield start
    for server in servers:
        server.shutdown()


def server_tls(pki: dict[str, Path], name: str, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki[f"{name}_pem"], pki[f"{name}_key"])
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def pacs_for(port: int, pki: dict[str, Path], **kw: Any) -> Any:
    return configured("127.0.0.1", port, "PACS", "RADSTREAM", 5.0, tls_ca=pki["ca_pem"], **kw)


def test_seg_goes_to_the_pacs_over_mutual_tls(scp: Any, pki: dict[str, Path]) -> None:
    port, received = scp(server_tls(pki, "pacs", client_ca=pki["ca_pem"]))
    data = seg_bytes()
    pacs = pacs_for(port, pki, tls_cert=pki["results_pem"], tls_key=pki["results_key"])
    assert deliver(pacs, data) == "delivered"
    assert received == [str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)]


def test_no_fallback_to_plain_dicom_and_no_impostor(scp: Any, pki: dict[str, Path]) -> None:
    plain_port, plain_received = scp(None)
    impostor_port, impostor_received = scp(server_tls(pki, "impostor"))
    for port in (plain_port, impostor_port):
        with pytest.raises(RetriableError):
            deliver(pacs_for(port, pki), seg_bytes())
    assert plain_received == [] and impostor_received == []


def test_a_pacs_beyond_loopback_without_tls_is_refused_at_start() -> None:
    with pytest.raises(PacsConfigError):
        configured("10.20.30.40", 104, "PACS", "RADSTREAM", 5.0)
    assert configured("127.0.0.1", 104, "PACS", "RADSTREAM", 5.0).tls is None
    allowed = configured("orthanc", 4242, "ORTHANC", "RADSTREAM", 5.0, allow_plaintext=True)
    assert allowed.tls is None

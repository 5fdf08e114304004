"""Results by DICOMweb without Orthanc: a scripted HTTP peer answers QIDO-RS and STOW-RS the
ways a PACS can (found, not found, 204, 404, 5xx, a FailedSOPSequence, gone), and the client
and the results core react as for C-STORE: check first, store once, retry what is transient,
record ``failed`` on the last attempt."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from services.results.core import Built, ResultsCore
from shared.dicomweb.client import DicomWebPacs, deliver, holds, stow
from shared.dicomweb.stow import PartResult, response_dataset
from shared.runtime.errors import RetriableError
from shared.runtime.stage import Context
from shared.security.envelope import Keyring
from shared.stack.broker import free_port

SEG = Path(str(get_testdata_file("liver_1frame.dcm", download=False))).read_bytes()
DS = pydicom.dcmread(io.BytesIO(SEG))
UIDS = (str(DS.StudyInstanceUID), str(DS.SeriesInstanceUID), str(DS.SOPInstanceUID))


@dataclass
class Script:
    """What the peer answers next: (status, JSON body) for GET and POST."""

    get: tuple[int, Any] = (200, [])
    post: tuple[int, Any] = (200, {})
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def peer() -> Iterator[tuple[DicomWebPacs, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.seen.append((method, self.path, dict(self.headers), body))
            status, payload = script.get if method == "GET" else script.post
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            del args

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield (
            DicomWebPacs(f"http://127.0.0.1:{port}/dicom-web", token="s3cret", timeout_s=5),
            script,
        )
    finally:
        server.shutdown()
        server.server_close()


def found(uid: str) -> list[dict[str, Any]]:
    return [{"00080018": {"vr": "UI", "Value": [uid]}}]


def test_qido_rs_answers(peer: tuple[DicomWebPacs, Script]) -> None:
    pacs, script = peer
    script.get = (200, found(UIDS[2]))
    assert holds(pacs, *UIDS) is True
    method, path, headers, _ = script.seen[-1]
    assert method == "GET" and path.startswith(f"/dicom-web/studies/{UIDS[0]}/series/{UIDS[1]}")
    assert f"SOPInstanceUID={UIDS[2]}" in path and headers["Authorization"] == "Bearer s3cret"
    script.get = (200, found("1.2.3"))
    assert holds(pacs, *UIDS) is False
    for status in (204, 404):
        script.get = (status, None)
        assert holds(pacs, *UIDS) is False
    script.get = (400, {})
    assert holds(pacs, *UIDS) is None  # cannot tell: the object is sent (same UID, no copy)
    script.get = (503, {})
    with pytest.raises(RetriableError):
        holds(pacs, *UIDS)


def test_stow_rs_answers(peer: tuple[DicomWebPacs, Script]) -> None:
    pacs, script = peer
    script.post = (200, {})
    stow(pacs, SEG, UIDS[0], UIDS[2])
    method, path, headers, body = script.seen[-1]
    assert method == "POST" and path == f"/dicom-web/studies/{UIDS[0]}"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert SEG in body
    refused = response_dataset([PartResult(str(DS.SOPClassUID), UIDS[2], 0xA700)])
    for answer in ((409, refused), (503, {}), (401, {})):
        script.post = answer
        with pytest.raises(RetriableError):
            stow(pacs, SEG, UIDS[0], UIDS[2])


def test_deliver_checks_first_and_stores_once(peer: tuple[DicomWebPacs, Script]) -> None:
    pacs, script = peer
    script.get = (200, [])
    assert deliver(pacs, SEG) == "delivered"
    assert [m for m, *_ in script.seen] == ["GET", "POST"]
    script.get = (200, found(UIDS[2]))  # a redo: the PACS has it
    assert deliver(pacs, SEG) == "already_present"
    assert [m for m, *_ in script.seen] == ["GET", "POST", "GET"]


def test_unreachable_dicomweb_pacs_is_retried_then_recorded_failed(tmp_path: Path) -> None:
    pacs = DicomWebPacs(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2)
    with pytest.raises(RetriableError):
        deliver(pacs, SEG)
    core = ResultsCore(store=None, pacs=pacs)  # type: ignore[arg-type]  # delivery only
    built = Built(seg=SEG, seg_uid=UIDS[2])
    keyring = Keyring.generate()
    first = Context("findings", 0, 7, b"k", 0, None, keyring, attempt=1, attempts=3)
    with pytest.raises(RetriableError):
        core.deliver(built, first)
    last = Context("findings", 0, 7, b"k", 0, None, keyring, attempt=3, attempts=3)
    (delivery,) = core.deliver(built, last)
    assert (delivery.object, delivery.outcome) == ("SEG", "failed")
    assert delivery.message and UIDS[2] not in delivery.message


def test_dicomweb_destination_settings() -> None:
    from pydantic import ValidationError

    from shared.config import ResultsSettings

    with pytest.raises(ValidationError, match="dicomweb_url"):
        ResultsSettings(pacs_protocol="dicomweb")
    with pytest.raises(ValueError, match="plain http"):
        DicomWebPacs("http://pacs.hospital.example/dicom-web")
    assert DicomWebPacs("http://pacs.hospital.example/dicom-web", allow_plaintext=True).url


def test_results_service_builds_the_configured_destination(tmp_path: Path) -> None:
    from services.results.main import build
    from shared.config import ResultsSettings, Settings

    url = "https://pacs.hospital.example/dicom-web"
    settings = Settings(
        home=tmp_path,
        results=ResultsSettings(pacs_protocol="dicomweb", dicomweb_url=url, pacs_timeout_s=7),
    )
    spec = build(settings, Keyring.generate())
    pacs = spec.handler.__self__.pacs  # type: ignore[attr-defined]
    assert isinstance(pacs, DicomWebPacs) and pacs.url == url and pacs.timeout_s == 7

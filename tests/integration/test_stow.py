"""The gateway's DICOMweb STOW-RS endpoint (a real process, HTTPS) against the real broker:
``dicomweb-client`` from PyPI as a client nobody here wrote, raw HTTP for what a client should
not be able to do (no token, bad parts, caps), and a client certificate for mutual TLS."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from shared.dicomweb.stow import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    encode_multipart,
    failed_in,
    stored_in,
)
from shared.schemas import DeadLetter, InstanceData, InstancesRecord
from shared.stack.broker import free_port
from tests.helpers import Env, Reader, StageProcess, metrics_text, wait_until_sync
from tests.tls import CLIENT, SERVER, make_pki

pytestmark = pytest.mark.integration

TOKEN = "orthanc-token-" + "x" * 24
SLOW_TOKEN = "slow-token-" + "y" * 24
CT_DIR = (
    Path(str(get_testdata_file("CT_small.dcm", download=False))).parent
    / "dicomdirtests"
    / "77654033"
    / "CT2"
)
MAX_REQUEST = 4 * 1024 * 1024
MAX_PART = 1024 * 1024


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Stow:
    """The running gateway's STOW-RS endpoint and the PKI around it."""

    def __init__(self, port: int, pki: dict[str, Path], proc: StageProcess) -> None:
        self.port = port
        self.pki = pki
        self.proc = proc
        self.url = f"https://127.0.0.1:{port}/dicom-web"

    def ssl(self, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca_pem"]))
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        return ctx

    async def post(
        self,
        body: bytes,
        content_type: str,
        token: str | None = TOKEN,
        path: str = "/studies",
        client: tuple[Path, Path] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.url + path, data=io.BytesIO(body), headers=headers, ssl=self.ssl(client)
            ) as resp,
        ):
            text = await resp.text()
            return resp.status, json.loads(text) if text else {}


@pytest.fixture
def stow(env: Env, tmp_path: Path) -> Iterator[Stow]:
    (tmp_path / "pki").mkdir()
    pki = make_pki(
        tmp_path / "pki",
        {
            "gateway": ("ca", SERVER),
            "modality-7": ("ca", CLIENT),
            "modality-8": ("ca", CLIENT),
            "stranger": ("rogue-ca", CLIENT),
        },
    )
    port = free_port()
    senders = [
        {"name": "orthanc", "token_sha256": sha(TOKEN)},
        {"name": "modality-7", "client_cn": "modality-7"},
        {"name": "slow", "token_sha256": sha(SLOW_TOKEN), "rate_per_s": 0.001, "burst": 1},
    ]
    proc = StageProcess(
        env.service_env(
            "gateway",
            RADSTREAM_GATEWAY__PORT=str(free_port()),
            RADSTREAM_GATEWAY__STOW__PORT=str(port),
            RADSTREAM_GATEWAY__STOW__TLS_CERT=str(pki["gateway_pem"]),
            RADSTREAM_GATEWAY__STOW__TLS_KEY=str(pki["gateway_key"]),
            RADSTREAM_GATEWAY__STOW__CLIENT_CA=str(pki["ca_pem"]),
            RADSTREAM_GATEWAY__STOW__SENDERS=json.dumps(senders),
            RADSTREAM_GATEWAY__STOW__MAX_REQUEST_BYTES=str(MAX_REQUEST),
            RADSTREAM_GATEWAY__STOW__MAX_PART_BYTES=str(MAX_PART),
            RADSTREAM_GATEWAY__STOW__WINDOW="2",  # fewer in flight than parts in a request
        ),
        "services.gateway.main",
        tmp_path / "gateway.log",
    ).start()
    wait_until_sync(proc.ready, 60, "gateway ready")
    yield Stow(port, pki, proc)
    assert proc.terminate() == 0


def ct_files() -> list[Path]:
    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())
    assert len(files) == 4
    return files


async def instances_on_kafka(env: Env, count: int) -> list[InstanceData]:
    async with Reader(env, "instances", InstancesRecord) as reader:
        await reader.wait_for(count, timeout=30)
        await reader.drain(1.0)
    return [r for r in reader.records if isinstance(r, InstanceData)]


async def test_dicomweb_client_stores_a_series_only_after_the_broker_has_each_instance(
    env: Env, stow: Stow
) -> None:
    files = ct_files()
    datasets = [pydicom.dcmread(f) for f in files]
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
    session.verify = str(stow.pki["ca_pem"])
    client = DICOMwebClient(stow.url, session=session, headers={"Authorization": f"Bearer {TOKEN}"})
    answer = await asyncio.to_thread(client.store_instances, datasets)
    referenced = [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence]
    assert sorted(referenced) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert "FailedSOPSequence" not in answer
    # the response came after the acks: every instance is on the topic, exactly once
    records = await instances_on_kafka(env, len(files))
    got = sorted(str(pydicom.dcmread(io.BytesIO(r.data)).SOPInstanceUID) for r in records)
    assert got == sorted(referenced)
    assert {r.source for r in records} == {"gateway"}
    assert 'radstream_stow_instances_total{outcome="stored"} 4.0' in metrics_text(stow.proc.port)


async def test_without_a_valid_token_401_and_nothing_reaches_kafka(env: Env, stow: Stow) -> None:
    body, ctype = encode_multipart([ct_files()[0].read_bytes()])
    for token in (None, "wrong-token", TOKEN[:-1]):
        status, answer = await stow.post(body, ctype, token=token)
        assert status == 401, (token, answer)
    # a certificate from another CA is not a client certificate we accept
    other = (stow.pki["stranger_pem"], stow.pki["stranger_key"])  # another CA's client
    with pytest.raises(aiohttp.ClientError):
        await stow.post(body, ctype, token=None, client=other)
    # then one valid request: the topic holds exactly its instance, nothing of the refused ones
    second, ctype2 = encode_multipart([ct_files()[1].read_bytes()])
    status, answer = await stow.post(second, ctype2)
    assert status == 200, answer
    records = await instances_on_kafka(env, 1)
    assert [r.data for r in records] == [ct_files()[1].read_bytes()]
    text = metrics_text(stow.proc.port)
    assert 'radstream_stow_requests_total{status="401"} 3.0' in text


async def test_bad_parts_are_answered_per_instance_and_dead_lettered(env: Env, stow: Stow) -> None:
    good = ct_files()[0].read_bytes()
    ds = pydicom.dcmread(io.BytesIO(good))
    study = str(ds.StudyInstanceUID)
    other = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    buf = io.BytesIO()
    other.save_as(buf)
    assert str(other.StudyInstanceUID) != study
    too_big = b"\0" * 128 + b"DICM" + b"\0" * MAX_PART
    body, ctype = encode_multipart(
        [good, b"this is not DICOM at all" * 10, buf.getvalue(), too_big]
    )
    # a fourth part that is not application/dicom
    boundary = ctype.rsplit("boundary=", 1)[1]
    body = body.replace(
        f"--{boundary}--".encode(),
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{boundary}--".encode(),
    )
    status, answer = await stow.post(body, ctype, path=f"/studies/{study}")
    assert status == 202, answer
    assert stored_in(answer) == [str(ds.SOPInstanceUID)]
    failed = failed_in(answer)
    assert failed[str(other.SOPInstanceUID)] == DOES_NOT_MATCH  # another study than the URL
    reasons = sorted(item["00081197"]["Value"][0] for item in answer["00081198"]["Value"])
    # not DICOM and not application/dicom: cannot understand; over the part cap: resources
    assert reasons == sorted([CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, DOES_NOT_MATCH, 0xA700])

    async with Reader(env, "deadletter", DeadLetter) as letters:
        await letters.wait_for(4, timeout=30)
        await letters.drain(1.0)
    assert sorted(d.reason for d in letters.records) == [
        "not_dicom",
        "study_mismatch",
        "too_large",
        "unsupported_media_type",
    ]
    for letter in letters.records:
        assert letter.stage == "gateway" and letter.source_topic == "stow-rs"
        assert study not in letter.message and str(other.SOPInstanceUID) not in letter.message
    records = await instances_on_kafka(env, 1)
    assert [r.data for r in records] == [good]
    text = metrics_text(stow.proc.port)
    assert 'radstream_deadletters_total{reason="study_mismatch",stage="gateway"} 1.0' in text

    # all parts bad: 409, nothing stored
    status, answer = await stow.post(*encode_multipart([b"junk" * 100]))
    assert status == 409 and not stored_in(answer)


async def test_mutual_tls_rate_and_size_caps(env: Env, stow: Stow) -> None:
    body, ctype = encode_multipart([ct_files()[2].read_bytes()])
    client = (stow.pki["modality_7_pem"], stow.pki["modality_7_key"])
    status, answer = await stow.post(body, ctype, token=None, client=client)
    assert status == 200, answer  # the certificate alone authenticates this sender
    stranger = (stow.pki["modality_8_pem"], stow.pki["modality_8_key"])  # good, not a sender
    status, _ = await stow.post(body, ctype, token=None, client=stranger)
    assert status == 401

    status, _ = await stow.post(body, ctype, token=SLOW_TOKEN)
    assert status == 200
    status, _ = await stow.post(body, ctype, token=SLOW_TOKEN)
    assert status == 429  # burst 1, then one request per ~17 minutes

    big, big_type = encode_multipart([b"\0" * (MAX_REQUEST + 1)])
    status, _ = await stow.post(big, big_type)
    assert status == 413
    status, _ = await stow.post(body, "application/dicom")
    assert status == 415
    records = await instances_on_kafka(env, 2)
    assert len(records) == 2  # the mTLS one and the first of the slow sender

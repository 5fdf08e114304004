"""Orthanc (with Debian's DICOMweb plugin) sends a study to RadStream by STOW-RS over HTTPS
with a bearer token and a client certificate (mutual TLS): its own DICOMweb client
(``/dicom-web/servers/<name>/stow``), nothing of ours on that side, through the gateway's
STOW-RS endpoint to Kafka, ingest, preprocess, segmentation and alert, each a real process: a
head CT with a bleed becomes exactly one haemorrhage alert. The same STOW-RS without the
client certificate is refused, and none of its instances reaches Kafka."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.dicom import phantom
from shared.schemas import Alert, InstancesRecord
from shared.stack.broker import free_port
from tests.helpers import (
    Env,
    Orthanc,
    Reader,
    StageProcess,
    wait_until_sync,
)
from tests.tls import CLIENT, SERVER, make_pki

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "e2e-orthanc-" + "z" * 32
STAGES = ("ingest", "preprocess", "segmentation", "alert")


async def test_orthanc_stow_rs_to_radstream_raises_the_alert(env: Env, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki", {"gateway": ("ca", SERVER), "orthanc-pacs": ("ca", CLIENT)})
    stow_port = free_port()
    # this sender needs both: its bearer token and its client certificate (mutual TLS)
    senders = [
        {
            "name": "orthanc",
            "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
            "client_cn": "orthanc-pacs",
        }
    ]
    extra = {
        "RADSTREAM_DEVICE": "cpu",
        # STOW-RS sends no end-of-series marker: ingest completes the series after this much
        # quiet. Orthanc's client may split a study over several requests (StowMaxInstances).
        # With 4 s, a busy CI machine once left a longer gap inside the send: ingest completed
        # a partial revision 1 and the rest made revision 2 (the one alert came at revision 2).
        # 15 s is half the default and far above any gap a send of 20 small slices has here.
        "RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S": "15",
        "RADSTREAM_GATEWAY__PORT": str(free_port()),
        "RADSTREAM_GATEWAY__STOW__PORT": str(stow_port),
        "RADSTREAM_GATEWAY__STOW__TLS_CERT": str(pki["gateway_pem"]),
        "RADSTREAM_GATEWAY__STOW__TLS_KEY": str(pki["gateway_key"]),
        "RADSTREAM_GATEWAY__STOW__SENDERS": json.dumps(senders),
        "RADSTREAM_GATEWAY__STOW__CLIENT_CA": str(pki["ca_pem"]),
    }
    procs = {
        name: StageProcess(
            env.service_env(name, **extra), f"services.{name}.main", tmp_path / f"{name}.log"
        ).start()
        for name in ("gateway", *STAGES)
    }
    sender = Orthanc(
        tmp_path / "orthanc",
        {},
        {
            "HttpsCACertificates": str(pki["ca_pem"]),
            "HttpsVerifyPeers": True,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    "radstream": {
                        "Url": f"https://127.0.0.1:{stow_port}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
                        "CertificateFile": str(pki["orthanc_pacs_pem"]),
                        "CertificateKeyFile": str(pki["orthanc_pacs_key"]),
                    },
                    # the token without the certificate is not enough for this sender
                    "intruder": {
                        "Url": f"https://127.0.0.1:{stow_port}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
                    },
                },
            },
        },
    ).start()
    try:
        for name, proc in procs.items():
            wait_until_sync(proc.ready, 120, f"{name} ready")
        head = phantom.head_ct(tmp_path / "head", seed=81, size=128, slices=20, bleed_ml=5.0)
        study = None
        for f in head.files:
            status, answer = sender.post("/instances", f.read_bytes())
            assert status == 200, answer
            study = answer["ParentStudy"]
        assert study is not None

        # with the token but without the certificate the STOW-RS is refused
        status, _ = sender.post(
            "/dicom-web/servers/intruder/stow", json.dumps({"Resources": [study]}).encode()
        )
        assert status != 200

        status, answer = sender.post(
            "/dicom-web/servers/radstream/stow", json.dumps({"Resources": [study]}).encode()
        )
        assert status == 200, answer

        async with Reader(env, "alerts", Alert) as feed:
            await feed.wait_for(1, timeout=300)
            await feed.drain(3.0)
        # each instance reached Kafka once: nothing of the refused request
        async with Reader(env, "instances", InstancesRecord) as sent:
            await sent.wait_for(len(head.files), timeout=60)
            await sent.drain(1.0)
        assert len(sent.records) == len(head.files)
        # one alert for the bleed (its severity is the calibrated rules' business)
        got = [(a.series_instance_uid, a.finding, a.revision) for a in feed.records]
        assert got == [(head.series_instance_uid, "haemorrhage", 1)]
        assert feed.records[0].latency_seconds < 300
    finally:
        sender.stop()
        for proc in procs.values():
            if proc.alive():
                proc.terminate()
    gateway_log = (tmp_path / "gateway.log").read_text()
    assert head.series_instance_uid not in gateway_log and TOKEN not in gateway_log

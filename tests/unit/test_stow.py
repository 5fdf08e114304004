"""STOW-RS without a network: who is let in, how fast, what a part is judged, and the PS3.18
response (tags, FailureReason, 200/202/409)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from services.gateway.stow import RateLimiter, authenticate, bearer, judge
from shared.config import StowSender
from shared.dicom.safe import Limits
from shared.dicomweb.stow import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PartResult,
    encode_multipart,
    failed_in,
    failure_reason,
    is_stow_content_type,
    response_dataset,
    response_status,
    stored_in,
)
from shared.schemas.reasons import Reason

CT = str(get_testdata_file("CT_small.dcm", download=False))


def sender(name: str, token: str | None = None, cn: str | None = None) -> StowSender:
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    return StowSender(name=name, token_sha256=digest, client_cn=cn, rate_per_s=1.0, burst=2)


def test_bearer_token_or_certificate_or_both_authenticate_a_sender() -> None:
    senders = [sender("a", token="tok-a"), sender("b", cn="mod-b"), sender("c", "tok-c", "mod-c")]
    assert bearer("Bearer tok-a") == "tok-a" and bearer("Basic abc") is None and bearer("") is None
    assert authenticate(senders, "tok-a", None) == senders[0]
    assert authenticate(senders, None, "mod-b") == senders[1]
    assert authenticate(senders, "tok-c", "mod-c") == senders[2]
    assert authenticate(senders, "tok-c", None) is None  # c needs both
    assert authenticate(senders, None, "mod-c") is None
    assert authenticate(senders, "tok-b", None) is None
    assert authenticate(senders, None, None) is None
    assert authenticate([StowSender(name="open")], None, None) is None  # no credentials: never


def test_rate_limiter_allows_the_burst_then_the_rate() -> None:
    now = [100.0]
    rate = RateLimiter(clock=lambda: now[0])
    s = sender("a", token="t")
    assert rate.take(s) == 0.0 and rate.take(s) == 0.0  # burst 2
    assert rate.take(s) > 0.0
    now[0] += 1.0  # one request per second comes back
    assert rate.take(s) == 0.0
    assert rate.take(s) > 0.0


def test_judge_uses_ingest_checks_media_type_and_study() -> None:
    data = Path(CT).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    limits = Limits()
    ok = judge(0, data, "application/dicom", str(ds.StudyInstanceUID), limits)
    assert ok.refused is None and ok.sop_instance_uid == str(ds.SOPInstanceUID)
    assert judge(1, data, "application/dicom", "1.2.3", limits).refused == Reason.STUDY_MISMATCH
    assert judge(2, data, "text/plain", None, limits).refused == Reason.UNSUPPORTED_MEDIA_TYPE
    assert judge(3, b"x" * 200, "application/dicom", None, limits).refused == Reason.NOT_DICOM
    small = Limits(max_bytes=1000)
    assert judge(4, data, "application/dicom", None, small).refused == Reason.TOO_LARGE


def test_response_follows_ps3_18() -> None:
    ok = PartResult("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    bad = PartResult("1.2.840.10008.5.1.4.1.1.2", "1.2.3.5", failure_reason(Reason.NOT_DICOM))
    body = response_dataset([ok, bad])
    assert body["00081199"]["vr"] == "SQ" and body["00081198"]["vr"] == "SQ"
    assert body["00081198"]["Value"][0]["00081197"] == {"vr": "US", "Value": [CANNOT_UNDERSTAND]}
    assert stored_in(body) == ["1.2.3.4"] and failed_in(body) == {"1.2.3.5": CANNOT_UNDERSTAND}
    assert pydicom.Dataset.from_json(body).ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        "1.2.3.4"
    )
    assert response_status([ok]) == 200
    assert response_status([ok, bad]) == 202
    assert response_status([bad]) == 409
    assert failure_reason(None) == OUT_OF_RESOURCES
    assert failure_reason(Reason.STUDY_MISMATCH) == DOES_NOT_MATCH
    assert failure_reason(Reason.TOO_LARGE) == OUT_OF_RESOURCES


def test_multipart_body_is_a_stow_request() -> None:
    body, ctype = encode_multipart([b"one", b"two"])
    assert is_stow_content_type(ctype)
    assert not is_stow_content_type("multipart/related; boundary=x")  # no type=application/dicom
    assert not is_stow_content_type('multipart/related; type="application/dicom"')  # no boundary
    boundary = ctype.rsplit("=", 1)[1]
    assert body.count(f"--{boundary}\r\n".encode()) == 2 and body.endswith(
        f"--{boundary}--\r\n".encode()
    )


def test_dicomweb_destination_refuses_plain_http_beyond_loopback() -> None:
    import pytest

    from shared.dicomweb.client import DicomWebPacs

    assert DicomWebPacs("http://127.0.0.1:8042/dicom-web").url
    assert DicomWebPacs("https://pacs.example.org/dicom-web", token="t").url
    assert "secret" not in repr(DicomWebPacs("https://pacs.example.org/dicom-web", token="secret"))
    for bad in ("http://pacs.example.org/dicom-web", "ftp://127.0.0.1/x", "pacs/dicom-web"):
        with pytest.raises(ValueError):
            DicomWebPacs(bad)


def test_local_stack_serves_stow_rs_with_a_token_only_its_runner_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import stat

    from shared import topology
    from shared.config import Settings
    from shared.stack import local

    monkeypatch.delenv("RADSTREAM_STACK_PORTS", raising=False)
    stack = local.LocalStack(tmp_path)
    stack.broker.ensure_secrets()
    gateway = topology.service("gateway")
    assert "RADSTREAM_GATEWAY__STOW__PORT" not in stack.service_env(gateway)
    assert "11443" in stack.prepare_stow()
    env = stack.service_env(gateway)
    token = stack.stow_token_file.read_text().strip()
    assert stat.S_IMODE(stack.stow_token_file.stat().st_mode) == 0o600
    assert token not in json.dumps(env)  # the gateway gets the hash only
    for name, value in env.items():
        if name.startswith("RADSTREAM_GATEWAY__STOW__"):
            monkeypatch.setenv(name, value)
    stow = Settings().gateway.stow
    assert stow.port == topology.PORTS.gateway_stow and stow.tls_cert is not None
    assert stow.tls_cert.exists()
    found = authenticate(stow.senders, token, None)
    assert found is not None and found.name == "local"
    assert authenticate(stow.senders, token + "x", None) is None


def test_compose_and_k8s_serve_stow_rs_to_the_modality_certificate_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml

    from shared.config import Settings

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["gateway"]
    docs = yaml.safe_load_all((root / "deploy" / "k8s" / "base" / "deployments.yaml").read_text())
    (k8s,) = [d for d in docs if d and d["metadata"]["name"] == "gateway"]
    (container,) = k8s["spec"]["template"]["spec"]["containers"]
    deployed = {
        "compose": (compose["environment"], compose["ports"]),
        "k8s": (
            {e["name"]: e["value"] for e in container["env"]},
            [f"127.0.0.1:{p['containerPort']}:{p['containerPort']}" for p in container["ports"]],
        ),
    }
    for where, (env, ports) in deployed.items():
        for name in [n for n in os.environ if n.startswith("RADSTREAM_GATEWAY__STOW__")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("RADSTREAM_GATEWAY__STOW__"):
                monkeypatch.setenv(name, str(value))
        stow = Settings().gateway.stow
        assert stow.port is not None and f"127.0.0.1:{stow.port}:{stow.port}" in ports, where
        assert stow.tls_cert is not None and stow.client_ca is not None, where
        assert [(s.name, s.token_sha256, s.client_cn) for s in stow.senders] == [
            ("modality", None, "modality")
        ], where
        assert authenticate(stow.senders, None, "modality") is not None
        assert authenticate(stow.senders, "any-token", None) is None

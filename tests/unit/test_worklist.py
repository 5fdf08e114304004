"""The worklist without a broker: the pure core (joins, roles, pseudonyms), accounts, the HTTP
side's refusals (no session, no CSRF token, another origin), escaping, TLS certificates."""

from __future__ import annotations

import asyncio
import re
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file

from services.worklist.core import Entry, Worklist, identity_from_seg, pseudonym, view
from services.worklist.web import COOKIE, WorklistWeb
from shared.schemas import Alert, AlertAck, BlobRef, NamedBlob, ResultsReady
from shared.security.accounts import Users, add_user
from shared.stack.broker import LocalBroker
from shared.stack.tls import issue_server_cert

SEG = Path(str(get_testdata_file("liver_1frame.dcm", download=False))).read_bytes()
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
KEY = b"0123456789abcdef0123456789abcdef"


def alert(label: str = "bleed-1", *, aid: str = "a1", revision: int = 1, **kw: Any) -> Alert:
    return Alert(
        alert_id=aid,
        severity=kw.pop("severity", "critical"),
        finding="haemorrhage",
        finding_label=label,
        rule="haemorrhage-any",
        routes=["worklist"],
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        revision=revision,
        modality="CT",
        body_part="HEAD",
        measurements={"volume_ml": 6.25, "diameter_mm": 21.0},
        algorithm="t",
        algorithm_version="1",
        source_partition=0,
        source_offset=0,
        latency_seconds=3.4,
        **kw,
    )


def results(revision: int = 1, seg: bool = True) -> ResultsReady:
    ref = BlobRef(digest="a" * 64, size=len(SEG), key_id="k")
    return ResultsReady(
        study_instance_uid=STUDY,
        series_instance_uid=SERIES,
        revision=revision,
        modality="CT",
        task="head_ct",
        algorithm="t",
        algorithm_version="1",
        seg=ref if seg else None,
        overlays=[
            NamedBlob(name="slice-0010.png", blob=BlobRef(digest="b" * 64, size=4, key_id="k"))
        ],
        delivery="not_configured",
        source_partition=0,
        source_offset=0,
    )


def ack(aid: str = "a1", ack_id: str = "k1") -> AlertAck:
    return AlertAck(ack_id=ack_id, alert_id=aid, user="dr-who", role="clinician", source="w")


# ---- core ----------------------------------------------------------------------------------
def test_alerts_are_listed_once_and_join_results_and_acks_in_either_order() -> None:
    wl = Worklist(max_alerts=3)
    assert wl.add_ack(ack()) is None  # the ack read before its alert is kept
    entry = wl.add_alert(alert(), KEY)
    assert entry is not None and [a.ack_id for a in entry.acks] == ["k1"]
    assert wl.add_alert(alert(), KEY) is None, "a re-read alert is not listed twice"
    assert wl.add_ack(ack()) is entry and len(entry.acks) == 1, "the same ack applied once"
    assert wl.add_results(results(revision=2)) == []  # another revision: not this alert
    assert wl.add_results(results()) == [entry] and entry.results is not None
    late = wl.add_alert(alert("bleed-2", aid="a2"), KEY)  # results came first this time
    assert late is not None and late.results is not None
    for i in range(3, 6):
        wl.add_alert(alert(aid=f"a{i}"), KEY)
    assert len(wl.newest()) == 3 and wl.get("a1") is None, "bounded: the oldest go"


def test_an_operator_sees_a_pseudonym_and_never_the_identity() -> None:
    entry = Entry(alert(), KEY, results(), [])
    identity = identity_from_seg(SEG)
    assert identity.name == "JANCT000" and identity.patient_id == "99000"
    seen = view(entry, "operator", identity)  # even if handed the identity
    text = repr(seen)
    assert seen.patient == pseudonym(KEY) == "S-0123456789" and not seen.identified
    for phi in ("JANCT000", "99000", "03086212", STUDY, SERIES):
        assert phi not in text
    clinician = view(entry, "clinician", identity)
    assert clinician.identified and "JANCT000" in clinician.patient and "99000" in clinician.patient
    assert ("volume", "6.2 mL") in clinician.measurements or (
        "volume",
        "6.3 mL",
    ) in clinician.measurements
    assert clinician.latency == "3.4 s" and clinician.overlays == ["/alerts/a1/overlays/0"]
    waiting = view(Entry(alert(), KEY), "clinician", None)
    assert not waiting.identified and waiting.patient.startswith("S-0123456789")


def test_a_row_says_which_model_its_confidence_came_from() -> None:
    second = alert(confidence=0.5, confidence_source="large_candidate_model")
    assert view(Entry(second, KEY), "operator", None).confidence == "50% (large candidate model)"
    assert view(Entry(alert(confidence=0.92), KEY), "operator", None).confidence == "92%"
    assert view(Entry(alert(), KEY), "operator", None).confidence == ""


# ---- accounts ------------------------------------------------------------------------------
def test_accounts_are_argon2id_hashes_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    add_user(path, "dr-who", "clinician", "correct horse battery")
    add_user(path, "ops", "operator", "another long secret")
    text = path.read_text()
    assert "correct horse" not in text and "$argon2id$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = Users.load(path)
    account = users.verify("dr-who", "correct horse battery")
    assert account is not None and account.role == "clinician"
    assert users.verify("dr-who", "wrong password!!") is None
    assert users.verify("nobody", "correct horse battery") is None
    with pytest.raises(ValueError, match="at least 12"):
        add_user(path, "x", "operator", "short")
    with pytest.raises(ValueError, match="role"):
        add_user(path, "x", "admin", "long enough password")  # type: ignore[arg-type]


# ---- HTTP ----------------------------------------------------------------------------------
class FakeBackend:
    def __init__(self) -> None:
        self.acks: list[tuple[bytes | None, AlertAck]] = []
        self.audited: list[tuple[str | None, str, str, str]] = []

    async def acknowledge(self, entry: Entry, ack: AlertAck) -> None:
        self.acks.append((entry.key, ack))

    def blob(self, ref: BlobRef) -> bytes:
        return SEG if ref.digest == "a" * 64 else b"\x89PNG"

    async def audit(
        self, user: str | None, action: str, resource: str, outcome: str, key: bytes | None
    ) -> None:
        self.audited.append((user, action, resource, outcome))


@pytest.fixture
def users(tmp_path: Path) -> Users:
    path = tmp_path / "users.json"
    add_user(path, "dr-who", "clinician", "correct horse battery")
    add_user(path, "ops", "operator", "another long secret")
    return Users.load(path)


async def _client(
    wl: Worklist, users: Users, backend: FakeBackend
) -> tuple[TestClient[Any, Any], WorklistWeb]:
    side = WorklistWeb(wl, users, backend, CollectorRegistry())
    client = TestClient(TestServer(side.app()))
    await client.start_server()
    return client, side


async def _login(client: TestClient[Any, Any], user: str, password: str) -> tuple[str, str]:
    """(cookie, csrf) after signing in. The cookie is Secure: the plain test server's jar
    would not send it, so it is passed by hand."""
    origin = str(client.make_url("")).rstrip("/")
    r = await client.post(
        "/login",
        data={"user": user, "password": password},
        headers={"Origin": origin},
        allow_redirects=False,
    )
    assert r.status == 303, await r.text()
    morsel = r.cookies[COOKIE]
    assert morsel["httponly"] and morsel["secure"] and morsel["samesite"] == "Strict"
    page = await client.get("/", headers={"Cookie": f"{COOKIE}={morsel.value}"})
    html = await page.text()
    (csrf,) = re.findall(r'<meta name="csrf" content="([^"]+)">', html)
    return morsel.value, csrf


async def test_nothing_without_a_session_and_no_state_change_without_csrf_and_origin(
    users: Users,
) -> None:
    wl = Worklist()
    wl.add_alert(alert("<script>alert(1)</script>"), KEY)
    backend = FakeBackend()
    client, _ = await _client(wl, users, backend)
    origin = str(client.make_url("")).rstrip("/")
    try:
        r = await client.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login"
        assert (await client.get("/events")).status == 401
        assert (await client.get("/alerts/a1/overlays/0")).status == 401
        r = await client.post("/alerts/a1/ack", data={"csrf": "x"}, headers={"Origin": origin})
        assert r.status == 401
        bad = await client.post(
            "/login",
            data={"user": "dr-who", "password": "nope nope nope"},
            headers={"Origin": origin},
        )
        assert bad.status == 401 and COOKIE not in bad.cookies
        cookie, csrf = await _login(client, "dr-who", "correct horse battery")
        auth = {"Cookie": f"{COOKIE}={cookie}", "Origin": origin}
        page = await client.get("/", headers=auth)
        html = await page.text()
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        no_token = await client.post("/alerts/a1/ack", data={}, headers=auth)
        wrong = await client.post("/alerts/a1/ack", data={"csrf": csrf + "x"}, headers=auth)
        elsewhere = await client.post(
            "/alerts/a1/ack",
            data={"csrf": csrf},
            headers={"Cookie": f"{COOKIE}={cookie}", "Origin": "https://evil.example"},
        )
        assert (no_token.status, wrong.status, elsewhere.status) == (403, 403, 403)
        assert backend.acks == []
        ok = await client.post(
            "/alerts/a1/ack", data={"csrf": csrf}, headers={**auth, "Accept": "application/json"}
        )
        assert ok.status == 200 and "acknowledged by dr-who" in (await ok.json())["html"]
        assert [(k, a.alert_id, a.role) for k, a in backend.acks] == [(KEY, "a1", "clinician")]
        # sign-ins are audited (a refused one without the name typed), and so is showing a
        # clinician the patient (once per session and alert): here no results, no identity
        assert backend.audited == [
            (None, "worklist_sign_in", "worklist", "denied"),
            ("dr-who", "worklist_sign_in", "role:clinician", "success"),
        ]
    finally:
        await client.close()


async def _first_row(resp: Any) -> str:
    """The data line of the first ``row`` event of an SSE response."""
    while True:
        line = (await resp.content.readline()).decode()
        if line.startswith("data: "):
            return line


async def test_each_role_gets_its_own_rows_live(users: Users) -> None:
    wl = Worklist()
    backend = FakeBackend()
    client, side = await _client(wl, users, backend)
    try:
        streams = {}
        for user, password in (("dr-who", "correct horse battery"), ("ops", "another long secret")):
            cookie, _ = await _login(client, user, password)
            resp = await client.get("/events", headers={"Cookie": f"{COOKIE}={cookie}"})
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await resp.content.readline() == b": connected\n"  # subscribed from here
            streams[user] = asyncio.ensure_future(_first_row(resp))
        assert wl.add_alert(alert(), KEY) is not None
        wl.add_results(results())
        side.changed("a1")
        clinician, operator = await asyncio.wait_for(
            asyncio.gather(streams["dr-who"], streams["ops"]), 10
        )
        assert "JANCT000" in clinician and "99000" in clinician
        for phi in ("JANCT000", "99000", "03086212", STUDY, SERIES):
            assert phi not in operator
        assert "S-0123456789" in operator
        shown = [a for a in backend.audited if a[1] == "patient_identity_shown"]
        assert shown == [("dr-who", "patient_identity_shown", "alert:a1", "success")]
    finally:
        await client.close()


async def test_five_wrong_passwords_lock_the_name(users: Users) -> None:
    client, _ = await _client(Worklist(), users, FakeBackend())
    origin = {"Origin": str(client.make_url("")).rstrip("/")}
    try:
        for _ in range(5):
            r = await client.post(
                "/login", data={"user": "ops", "password": "wrong wrong wrong"}, headers=origin
            )
            assert r.status == 401
        right = {"user": "ops", "password": "another long secret"}
        locked = await client.post("/login", data=right, headers=origin, allow_redirects=False)
        assert locked.status == 429 and COOKIE not in locked.cookies
        other = await client.post(
            "/login",
            data={"user": "dr-who", "password": "correct horse battery"},
            headers=origin,
            allow_redirects=False,
        )
        assert other.status == 303, "only the attacked name is locked"
    finally:
        await client.close()


async def test_a_reconnecting_page_gets_every_listed_row_again(users: Users) -> None:
    wl = Worklist()
    assert wl.add_alert(alert(aid="a1"), KEY) is not None
    assert wl.add_alert(alert("bleed-2", aid="a2"), KEY) is not None
    client, _ = await _client(wl, users, FakeBackend())
    try:
        cookie, _ = await _login(client, "ops", "another long secret")
        auth = {"Cookie": f"{COOKIE}={cookie}"}
        resp = await client.get("/events", headers={**auth, "Last-Event-ID": "7"})
        rows = [await _first_row(resp), await _first_row(resp)]
        assert ['"id": "a1"' in r for r in rows] == [True, False], "oldest first"
        assert '"id": "a2"' in rows[1]
    finally:
        await client.close()


def test_the_worklist_certificate_chains_to_the_stack_ca_for_127_0_0_1(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path)
    broker.ensure_secrets()
    cert, key = issue_server_cert(broker.tls_dir, "worklist")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert issue_server_cert(broker.tls_dir, "worklist") == (cert, key)  # kept while valid
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(broker.ca_file))

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def fetch() -> int:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with (
                ClientSession() as s,
                s.get(f"https://127.0.0.1:{port}/", ssl=client_ctx) as r,
            ):
                return r.status
        finally:
            await runner.cleanup()

    assert asyncio.run(fetch()) == 200  # host name and chain checked by the client


# ---- OIDC bearer tokens ----------------------------------------------------------------------
ISSUER, AUDIENCE = "https://idp.hospital.example/realms/radiology", "radstream-worklist"


def _idp() -> tuple[Any, dict[str, Any]]:
    """An identity provider's signing key and its JWKS."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return key, {"keys": [{**jwk, "kid": "idp-1", "use": "sig", "alg": "ES256"}]}


def _token(key: Any, **claims: Any) -> str:
    import time

    import jwt

    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-42", "iat": now, "exp": now + 300}
    body.update({"preferred_username": "dr-oidc", "roles": ["clinician"]})
    body.update(claims)
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "idp-1"})


async def test_oidc_bearer_tokens_are_verified_offline_and_need_no_csrf(users: Users) -> None:
    from services.worklist.oidc import BearerVerifier

    key, jwks = _idp()
    other, _ = _idp()
    wl = Worklist()
    wl.add_alert(alert(), KEY)
    backend = FakeBackend()
    side = WorklistWeb(
        wl, users, backend, CollectorRegistry(),
        bearer=BearerVerifier(ISSUER, AUDIENCE, jwks, "roles"),
    )  # fmt: skip
    client = TestClient(TestServer(side.app()))
    await client.start_server()

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    try:
        refused = {
            "expired": _token(key, exp=1_000_000, iat=999_000),
            "audience": _token(key, aud="someone-else"),
            "issuer": _token(key, iss="https://evil.example"),
            "signer": _token(other),
            "no role": _token(key, roles=["visitor"]),
            "both roles": _token(key, roles=["clinician", "operator"]),
            "garbage": "not.a.jwt",
        }
        for why, token in refused.items():
            assert (await client.get("/events", headers=bearer(token))).status == 401, why
            r = await client.post("/alerts/a1/ack", headers=bearer(token))
            assert r.status == 401, why
        assert backend.acks == []
        ok = await client.post(
            "/alerts/a1/ack", headers={**bearer(_token(key)), "Accept": "application/json"}
        )
        assert ok.status == 200, await ok.text()
        assert [(a.user, a.role) for _, a in backend.acks] == [("dr-oidc", "clinician")]
        stream = await client.get("/events", headers=bearer(_token(key, roles=["operator"])))
        assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
    finally:
        await client.close()

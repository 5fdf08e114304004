"""The worklist in a real headless Chromium (Debian's chromium + chromedriver, Selenium):
a finding goes through the real alert and results services on the real broker; the alert
appears on a signed-in clinician's and operator's open pages within 2 s of its publication
without a reload; the clinician sees the patient (from the SEG), the operator only a
pseudonym; acknowledging reaches the acks topic and the audit trail and updates the other
page; the page fits a 1366x768 screen. Screenshots go to test-artifacts/worklist/."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.preprocess.core import PreprocessCore
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.runtime.stage import Context
from shared.schemas import Alert, AlertAck, AuditEvent, SegmentationDone
from shared.security.accounts import add_user
from shared.stack.broker import free_port
from shared.stack.tls import issue_server_cert
from shared.storage import BlobStore, LocalDirBackend
from tests.helpers import REPO, Env, Reader, StageProcess, wait_until, wait_until_sync
from tests.pipeline import files, series_ready

pytestmark = [pytest.mark.integration]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("RADSTREAM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "worklist"
CLINICIAN = ("dr-house", "clinician-secret-123")
OPERATOR = ("night-ops", "operator-secret-456")
WIDTH, HEIGHT = 1366, 768

needs_chromium = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver are not installed (make debs)",
)


def findings(env: Env, ph: phantom.Phantom) -> SegmentationDone:
    """What segmentation publishes for this phantom (its own cores, offline)."""
    store = BlobStore(LocalDirBackend(env.settings("results").blob_path), env.keyring)
    pre = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
    seg = SegmentationCore(store, select_backend("cpu"))
    ctx = Context("offline", 0, 0, b"k", 0, None, env.keyring)
    return seg.handle(pre.handle(series_ready(files(ph.files), store, env.keyring), ctx), ctx)


def spki_pin(cert_pem: Path) -> str:
    """Chromium's pin for exactly this certificate's key (no blanket ignore of TLS errors)."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[list[webdriver.Chrome]]:
    made: list[webdriver.Chrome] = []

    def make(pin: str) -> webdriver.Chrome:
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "chromium"
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--ignore-certificate-errors-spki-list={pin}",
            f"--user-data-dir={tmp_path / f'profile-{len(made)}'}",
        ):
            opts.add_argument(arg)
        service = ChromeService(executable_path=shutil.which("chromedriver") or "chromedriver")
        driver = webdriver.Chrome(options=opts, service=service)
        made.append(driver)
        # the page area exactly a 1366x768 screen (the window's own bars are not the page's)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        return driver

    yield make  # type: ignore[misc]
    for driver in made:
        driver.quit()


def sign_in(driver: webdriver.Chrome, base: str, user: str, password: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(driver, 15).until(
        lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "open"
    )


def until(driver: webdriver.Chrome, condition: Any, timeout: float, poll: float = 0.1) -> Any:
    """Wait on a condition; rows are replaced as updates arrive, so a stale or missing
    element only means: not yet."""
    return WebDriverWait(
        driver, timeout, poll_frequency=poll, ignored_exceptions=(StaleElementReferenceException,)
    ).until(condition)


def text(driver: webdriver.Chrome, css: str) -> str:
    """The text of the element at ``css`` now (one read in the page: never stale)."""
    return str(
        driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css
        )
    )


def overflow(driver: webdriver.Chrome) -> dict[str, int]:
    return dict(
        driver.execute_script(
            "return {scroll: document.documentElement.scrollWidth,"
            " client: document.documentElement.clientWidth, inner: window.innerWidth,"
            " height: window.innerHeight};"
        )
    )


WATCH = """
window.__listed = null;
new MutationObserver(() => {
  if (window.__listed === null && document.querySelector('article.alert')) {
    window.__listed = performance.timeOrigin + performance.now();
  }
}).observe(document.getElementById('alerts'), {childList: true});
"""


def listed_at(driver: webdriver.Chrome) -> float | None:
    """When the page itself put the first alert row in (ms since the epoch, browser clock)."""
    at = driver.execute_script("return window.__listed;")
    return None if at is None else float(at) / 1000.0


def pictures_loaded(driver: webdriver.Chrome) -> bool:
    return bool(
        driver.execute_script(
            "const i = document.querySelectorAll('article.alert .overlays img');"
            "return i.length > 0 && [...i].every(x => x.complete && x.naturalWidth > 0);"
        )
    )


@needs_chromium
async def test_alert_appears_live_is_acknowledged_and_each_role_sees_what_it_may(
    env: Env, tmp_path: Path, browsers: object
) -> None:
    make = browsers  # type: ignore[assignment]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    head = phantom.head_ct(tmp_path / "head", seed=73, size=128, slices=20, bleed_ml=4.0)
    done = findings(env, head)
    assert any(f.type == "haemorrhage" for f in done.findings)

    users = tmp_path / "worklist-users.json"
    add_user(users, *CLINICIAN[:1], "clinician", CLINICIAN[1])
    add_user(users, *OPERATOR[:1], "operator", OPERATOR[1])
    cert, key = issue_server_cert(env.broker.tls_dir, "worklist")
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    procs = [
        StageProcess(
            env.service_env(
                "worklist",
                RADSTREAM_WORKLIST__PORT=str(port),
                RADSTREAM_WORKLIST__TLS_CERT=str(cert),
                RADSTREAM_WORKLIST__TLS_KEY=str(key),
                RADSTREAM_WORKLIST__USERS_FILE=str(users),
            ),
            "services.worklist.main",
            tmp_path / "worklist.log",
        ).start(),
        StageProcess(
            env.service_env("alert"), "services.alert.main", tmp_path / "alert.log"
        ).start(),
        StageProcess(
            env.service_env("results"), "services.results.main", tmp_path / "results.log"
        ).start(),
    ]
    worklist = procs[0]
    try:
        for p in procs:
            wait_until_sync(p.ready, 120, f"{p.module} ready")

        # HTTPS with the stack CA's certificate; nothing without signing in
        ca = ssl.create_default_context(cafile=str(env.broker.ca_file))
        for path in ("/events", "/alerts/x/overlays/0"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}{path}", context=ca, timeout=5)  # noqa: ASYNC210
            assert refused.value.code == 401

        clinician, operator = make(spki_pin(cert)), make(spki_pin(cert))
        sign_in(clinician, base, *CLINICIAN)
        sign_in(operator, base, *OPERATOR)
        assert clinician.find_elements(By.CSS_SELECTOR, "article.alert") == []
        for driver in (clinician, operator):
            driver.execute_script(WATCH)

        async with Reader(env, "alerts", Alert) as alerts:
            await env.produce(
                "findings", [(env.keyring.keyed_hash(done.series_instance_uid), done)]
            )

            # the alert stage takes its time; the page must not. The pages note the moment a
            # row is added; a read_committed reader here notes when the alert was published
            # (its transaction committed: readable). Browser, reader and Kafka share one clock.
            async def committed() -> bool:
                if await alerts.poll():
                    visible.setdefault("at", time.time())
                return bool(alerts.records)

            visible: dict[str, float] = {}
            pages = asyncio.gather(
                *(asyncio.to_thread(until, d, listed_at, 120) for d in (clinician, operator))
            )
            await wait_until(committed, 120, "the alert on the alerts topic")
            await pages
            await alerts.drain(1.0)
        created = min(rec.timestamp for rec in alerts.raw) / 1000.0
        for driver, who in ((clinician, "clinician"), (operator, "operator")):
            at = listed_at(driver) or 0.0
            print(
                f"{who}: alert on the page {at - visible['at']:.3f} s after it was committed "
                f"({at - created:.3f} s after the alert stage produced it)"
            )
            assert at - visible["at"] <= 2.0, f"{who}: {at - visible['at']:.2f} s after publication"
        ids = {a.alert_id for a in alerts.records}
        listed = clinician.execute_script(
            "return [...document.querySelectorAll('article.alert')].map(r => r.dataset.alertId);"
        )
        assert set(listed) == ids
        first = next(a for a in alerts.records if a.finding == "haemorrhage")
        row_css = f"#alert-{first.alert_id}"
        assert first.severity in text(clinician, f"{row_css} .severity").lower()
        assert text(clinician, f"{row_css} .latency") == f"{first.latency_seconds:.1f} s"

        # the results (SEG, pictures) follow: the clinician's row names the patient, the
        # operator's keeps the pseudonym; both show the overlay pictures
        name = "PHANTOM HEAD 73"
        until(clinician, lambda d: name in text(d, f"{row_css} .patient"), 120)
        for driver in (clinician, operator):
            until(driver, pictures_loaded, 30)
        for driver, who in ((clinician, "clinician"), (operator, "operator")):
            size = overflow(driver)
            assert (size["inner"], size["height"]) == (WIDTH, HEIGHT), size
            assert size["scroll"] <= size["client"], f"{who}: the page scrolls sideways {size}"
            driver.save_screenshot(str(ARTIFACTS / f"{who}.png"))
        page = operator.page_source
        for phi in (
            "PHANTOM",
            head.study_instance_uid,
            head.series_instance_uid,
            "RS-PH-",
            "RS-HEAD-",
        ):
            assert phi not in page, f"the operator's page shows {phi}"
        assert text(operator, f"{row_css} .patient").startswith("S-")

        # acknowledge on the clinician's page: the acks topic and the audit trail get it, the
        # operator's open page shows it
        async with (
            Reader(env, "acks", AlertAck) as acks,
            Reader(env, "audit.in.worklist", AuditEvent) as audit,
        ):
            until(
                clinician,
                lambda d: (
                    d.find_element(By.CSS_SELECTOR, f"{row_css} form.ack button").click() or True
                ),
                5,
            )
            (ack,) = await acks.wait_for(1, timeout=15)
            await wait_until(
                lambda: _audited(audit, first.alert_id), 15, "the acknowledgement's audit event"
            )
        assert (ack.alert_id, ack.user, ack.role) == (first.alert_id, CLINICIAN[0], "clinician")
        trail = {(e.actor, e.action, e.resource) for e in audit.records}
        # who signed in, and that the clinician (only) was shown the patient, are on record
        assert (f"worklist:{CLINICIAN[0]}", "worklist_sign_in", "role:clinician") in trail
        assert (f"worklist:{OPERATOR[0]}", "worklist_sign_in", "role:operator") in trail
        shown = {(a, r) for a, act, r in trail if act == "patient_identity_shown"}
        assert {a for a, _ in shown} == {f"worklist:{CLINICIAN[0]}"}, "an operator saw a patient"
        assert (f"worklist:{CLINICIAN[0]}", f"alert:{first.alert_id}") in shown
        assert acks.raw[0].key == env.keyring.keyed_hash(done.series_instance_uid)
        for driver in (clinician, operator):
            until(driver, lambda d: "acknowledged by dr-house" in text(d, row_css), 5, 0.05)
        clinician.save_screenshot(str(ARTIFACTS / "clinician-acknowledged.png"))
        print(f"worklist screenshots: {ARTIFACTS}")
    finally:
        codes = [p.terminate() if p.alive() else None for p in procs]
    assert codes == [0, 0, 0]
    log = (tmp_path / "worklist.log").read_text()
    assert "sign-in role=clinician" in log  # it does log, and nothing of the patient
    for phi in (
        "PHANTOM",
        head.study_instance_uid,
        head.series_instance_uid,
        "RS-PH-",
        CLINICIAN[1],
    ):
        assert phi not in log
    assert worklist.proc is not None


async def _audited(audit: Reader, alert_id: str) -> bool:
    await audit.poll()
    return any(
        (e.actor, e.action, e.resource)
        == (f"worklist:{CLINICIAN[0]}", "alert_acknowledged_by_clinician", f"alert:{alert_id}")
        for e in audit.records
    )

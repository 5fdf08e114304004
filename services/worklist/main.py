"""Worklist service: the live alert worklist in the browser (HTTPS), see
:mod:`services.worklist.web`; it runs as the Kafka principal ``worklist``."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from aiohttp import web  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from services.worklist.core import Worklist  # noqa: E402
from services.worklist.feed import Feed  # noqa: E402
from services.worklist.oidc import BearerVerifier  # noqa: E402
from services.worklist.web import WorklistWeb  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.metrics.http import HealthServer  # noqa: E402
from shared.runtime.service import configure_process  # noqa: E402
from shared.security.accounts import Users  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.security.kek import keyring_for  # noqa: E402
from shared.storage import local_store  # noqa: E402

log = logging.getLogger("radstream.worklist")


def tls_context(settings: Settings) -> ssl.SSLContext:
    w = settings.worklist
    if w.tls_cert is None or w.tls_key is None:
        raise SystemExit("worklist: RADSTREAM_WORKLIST__TLS_CERT and __TLS_KEY are required")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(w.tls_cert, w.tls_key)
    return ctx


@dataclass
class WorklistService:
    """The worklist's Kafka side, its web side and its /metrics, /healthz, /readyz (ready once
    it has caught up with the topics)."""

    feed: Feed
    web: WorklistWeb
    http: HealthServer
    accounts: int


def build(settings: Settings, keyring: Keyring, registry: CollectorRegistry) -> WorklistService:
    """Wire the worklist (nothing connects or listens until :func:`serve` runs it)."""
    worklist = Worklist(settings.worklist.max_alerts)
    store = local_store(settings.blob_path, keyring)
    path = settings.worklist_users_path
    users = Users.load(path) if path.exists() else Users({})
    feed = Feed(settings, keyring, store, worklist)
    w = settings.worklist
    bearer = None
    if w.oidc_issuer:
        if w.oidc_jwks_file is None:
            raise SystemExit(
                "worklist: RADSTREAM_WORKLIST__OIDC_JWKS_FILE is required with an issuer"
            )
        bearer = BearerVerifier.from_file(
            w.oidc_issuer, w.oidc_audience, w.oidc_jwks_file, w.oidc_roles_claim
        )
    web_side = WorklistWeb(
        worklist,
        users,
        feed,
        registry,
        source=settings.worklist.source,
        session_ttl_s=settings.worklist.session_ttl_s,
        bearer=bearer,
    )
    feed.changed = web_side.changed
    http = HealthServer(registry, settings.metrics_host, settings.metrics_port, lambda: feed.ready)
    return WorklistService(feed, web_side, http, len(users))


async def serve(settings: Settings) -> None:
    svc = build(settings, keyring_for(settings), CollectorRegistry())
    if svc.accounts == 0 and svc.web.bearer is None:
        raise SystemExit(f"worklist: no accounts in {settings.worklist_users_path}")
    feed, health = svc.feed, svc.http
    runner = web.AppRunner(svc.web.app(), access_log=None)  # URLs and clients stay unlogged
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await health.start()
    await feed.start()
    await runner.setup()
    site = web.TCPSite(
        runner, settings.worklist.host, settings.worklist.port, ssl_context=tls_context(settings)
    )
    await site.start()
    log.info("worklist listening on https://%s:%d", settings.worklist.host, settings.worklist.port)
    following = asyncio.create_task(feed.run())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if following in done:
            following.result()  # the feed failed: raise it (non-zero exit)
    finally:
        following.cancel()
        svc.web.close()
        await runner.cleanup()
        await feed.stop()
        await health.stop()


def main() -> int:
    configure_process()
    settings = Settings()
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

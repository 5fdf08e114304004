"""The worklist's HTTP side (aiohttp, HTTPS only): sign-in, the page, live rows over
server-sent events, acknowledgements, overlay pictures.

Security: argon2id passwords (:mod:`shared.security.accounts`); a session is a random token in
an HttpOnly, Secure, SameSite=Strict cookie, kept in memory with an expiry; every POST needs
the session's CSRF token and a same-origin Origin (or Referer); everything rendered goes
through Jinja2 with autoescaping; a strict Content-Security-Policy (no inline script).
Nothing of a patient is logged: logs and metric labels carry roles, outcomes and counts only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import jinja2
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worklist.core import (
    AlertView,
    Entry,
    Identity,
    Worklist,
    identity_from_seg,
    new_ack,
    view,
)
from services.worklist.oidc import BearerVerifier
from shared.schemas import AlertAck, BlobRef
from shared.schemas.models import utcnow
from shared.security.accounts import Account, Role, Users

log = logging.getLogger("radstream.worklist")
HERE = Path(__file__).resolve().parent
COOKIE = "rs_worklist"
_END = ""  # queued to a live connection: the server is closing it
MAX_FAILED_LOGINS = 5  # per user name, then locked for LOCKOUT_S
LOCKOUT_S = 300.0
MAX_TRACKED = 10_000  # sessions and failed-sign-in counters kept in memory at most
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


class Backend(Protocol):
    """What the web side needs from Kafka and the blob store (:class:`Feed` in production)."""

    async def acknowledge(self, entry: Entry, ack: AlertAck) -> None:
        """Write the acknowledgement and its audit event; return once the broker has them."""
        ...

    def blob(self, ref: BlobRef) -> bytes:
        """The plaintext of one blob (blocking: called in a thread)."""
        ...

    async def audit(
        self,
        user: str | None,
        action: str,
        resource: str,
        outcome: Literal["success", "denied", "error"],
        key: bytes | None,
    ) -> None:
        """Put an event on the audit trail (``user``: the signed-in account, if any)."""
        ...


@dataclass
class Session:
    account: Account
    csrf: str
    expires: float
    shown: set[str] = field(default_factory=set)  # alerts whose patient it was shown (audited)
    bearer: bool = False  # an OIDC bearer token, not a cookie: CSRF does not apply


@dataclass(eq=False)  # one per connection, hashed by identity
class Client:
    role: Role
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))


class WebMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.logins = Counter(
            "radstream_worklist_logins",
            "Sign-in attempts by outcome",
            ["outcome"],
            registry=registry,
        )
        self.acks = Counter(
            "radstream_worklist_acks", "Alerts acknowledged on the worklist", registry=registry
        )
        self.clients = Gauge(
            "radstream_worklist_live_clients", "Open live (SSE) connections", registry=registry
        )
        self.push = Histogram(
            "radstream_worklist_push_latency_seconds",
            "Alert created → its row sent to a browser",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.refused = Counter(
            "radstream_worklist_requests_refused",
            "Requests refused by reason",
            ["reason"],
            registry=registry,
        )


class WorklistWeb:
    def __init__(
        self,
        worklist: Worklist,
        users: Users,
        backend: Backend,
        registry: CollectorRegistry,
        *,
        source: str = "worklist",
        session_ttl_s: float = 8 * 3600.0,
        bearer: BearerVerifier | None = None,
    ) -> None:
        self.worklist = worklist
        self.bearer = bearer
        self._bearer_shown: OrderedDict[str, set[str]] = OrderedDict()  # per token subject
        self.users = users
        self.backend = backend
        self.metrics = WebMetrics(registry)
        self.source = source
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        self._clients: set[Client] = set()
        self._event_id = 0  # ids of row events: a reconnecting browser says it saw some
        self._identities: OrderedDict[tuple[str, int], Identity] = OrderedDict()
        self._jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every template, every value
            undefined=jinja2.StrictUndefined,
        )

    # ---- the feed tells us -------------------------------------------------------------
    def changed(self, alert_id: str) -> None:
        """An entry is new or changed: every open page gets its row (rendered per role)."""
        for client in list(self._clients):
            try:
                client.queue.put_nowait(alert_id)
            except asyncio.QueueFull:
                self._clients.discard(client)  # too slow: it reconnects and reloads

    def close(self) -> None:
        """End every live connection (at shutdown; browsers reconnect to another instance)."""
        for client in list(self._clients):
            self._clients.discard(client)
            try:
                client.queue.put_nowait(_END)
            except asyncio.QueueFull:
                pass  # its loop sees it left the set at its next keep-alive

    # ---- app ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers], client_max_size=64 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._guard(self._logout))
        app.router.add_get("/events", self._events)
        app.router.add_post("/alerts/{alert_id}/ack", self._guard(self._ack))
        app.router.add_get("/alerts/{alert_id}/overlays/{n}", self._overlay)
        app.router.add_static("/static/", HERE / "static", show_index=False)
        return app

    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resp = await handler(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    # ---- sessions ----------------------------------------------------------------------
    def _session(self, request: web.Request) -> Session | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return self._bearer_session(auth[len("Bearer ") :].strip())
        token = request.cookies.get(COOKIE, "")
        session = self._sessions.get(token) if token else None
        if session is None:
            return None
        if session.expires < time.time():
            del self._sessions[token]
            return None
        return session

    def _bearer_session(self, token: str) -> Session | None:
        verified = self.bearer.verify(token) if self.bearer is not None else None
        if verified is None:
            self.metrics.refused.labels("bearer_invalid").inc()
            return None
        account, expires = verified
        shown = self._bearer_shown.setdefault(account.name, set())
        while len(self._bearer_shown) > MAX_TRACKED:
            self._bearer_shown.popitem(last=False)
        return Session(account, "", expires, shown, bearer=True)

    def _valid(self, request: web.Request, session: Session) -> bool:
        """Still the same sign-in (a live stream ends when its session does)."""
        if session.bearer:
            return session.expires >= time.time()
        return self._session(request) is session

    def _refuse(self, reason: str, status: int) -> web.Response:
        self.metrics.refused.labels(reason).inc()
        return web.json_response({"error": reason}, status=status)

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin") or request.headers.get("Referer") or ""
        expected = f"{request.scheme}://{request.host}"
        return origin == expected or origin.startswith(expected + "/")

    def _guard(
        self, handler: Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A state-changing request: signed in, same origin, the session's CSRF token."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self._session(request)
            if session is None:
                return self._refuse("unauthenticated", 401)
            if session.bearer:
                return await handler(request, session)
            if not self._same_origin(request):
                return self._refuse("cross_origin", 403)
            form = await request.post()
            token = str(form.get("csrf", "")) or request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(token.encode(), session.csrf.encode()):
                return self._refuse("csrf", 403)
            return await handler(request, session)

        return guarded

    # ---- pages -------------------------------------------------------------------------
    def _render(self, template: str, status: int = 200, **context: object) -> web.Response:
        body = self._jinja.get_template(template).render(**context)
        return web.Response(text=body, status=status, content_type="text/html")

    async def _login_form(self, request: web.Request) -> web.Response:
        return self._render("login.html", error="", user="")

    async def _login(self, request: web.Request) -> web.Response:
        if not self._same_origin(request):
            return self._refuse("cross_origin", 403)
        form = await request.post()
        name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))[:256]
        count, since = self._failures.get(name, (0, 0.0))
        if count >= MAX_FAILED_LOGINS and time.monotonic() - since < LOCKOUT_S:
            self.metrics.logins.labels("locked").inc()
            return self._render("login.html", 429, error="Too many attempts; wait.", user=name)
        account = await asyncio.to_thread(self.users.verify, name, password)
        if account is None:
            if len(self._failures) >= MAX_TRACKED:  # bounded, whatever names are tried
                self._failures.pop(next(iter(self._failures)))
            self._failures[name] = (count + 1, time.monotonic())
            self.metrics.logins.labels("failure").inc()
            log.info("sign-in refused")
            # the typed name is not recorded: it may be a password typed in the wrong field
            await self.backend.audit(None, "worklist_sign_in", "worklist", "denied", None)
            return self._render("login.html", 401, error="Wrong user or password.", user=name)
        self._failures.pop(name, None)
        token = secrets.token_urlsafe(32)
        if len(self._sessions) >= MAX_TRACKED:
            now = time.time()
            for old in [t for t, sess in self._sessions.items() if sess.expires < now]:
                del self._sessions[old]
            if len(self._sessions) >= MAX_TRACKED:  # still full: the oldest sign-in goes
                self._sessions.pop(next(iter(self._sessions)))
        self._sessions[token] = Session(
            account, secrets.token_urlsafe(32), time.time() + self.session_ttl_s
        )
        self.metrics.logins.labels("success").inc()
        log.info("sign-in role=%s", account.role)
        await self.backend.audit(
            account.name, "worklist_sign_in", f"role:{account.role}", "success", None
        )
        resp = _redirect("/")
        resp.set_cookie(
            COOKIE,
            token,
            httponly=True,
            secure=True,
            samesite="Strict",
            path="/",
            max_age=int(self.session_ttl_s),
        )
        return resp

    async def _logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        token = request.cookies.get(COOKIE, "")
        self._sessions.pop(token, None)
        resp = _redirect("/login")
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def _identity(self, entry: Entry) -> Identity | None:
        """The patient's identity from the results' SEG, opened once per series revision."""
        results = entry.results
        if results is None or results.seg is None:
            return None
        join = (results.series_instance_uid, results.revision)
        known = self._identities.get(join)
        if known is not None:
            return known
        seg = results.seg
        identity = await asyncio.to_thread(lambda: identity_from_seg(self.backend.blob(seg)))
        self._identities[join] = identity
        while len(self._identities) > self.worklist.max_alerts:
            self._identities.popitem(last=False)
        return identity

    async def _view(self, entry: Entry, session: Session) -> AlertView:
        """What this session sees of ``entry``; a patient's identity shown to a clinician is
        audited (once per session and alert)."""
        role = session.account.role
        identity = await self._identity(entry) if role == "clinician" else None
        seen = view(entry, role, identity)
        if seen.identified and entry.alert.alert_id not in session.shown:
            session.shown.add(entry.alert.alert_id)
            await self.backend.audit(
                session.account.name,
                "patient_identity_shown",
                f"alert:{entry.alert.alert_id}",
                "success",
                entry.key,
            )
        return seen

    async def _row(self, entry: Entry, session: Session) -> str:
        v = await self._view(entry, session)
        return self._jinja.get_template("row.html").render(v=v, csrf=session.csrf)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None:
            return _redirect("/login")
        views = [await self._view(entry, session) for entry in self.worklist.newest()]
        return self._render(
            "worklist.html",
            views=views,
            csrf=session.csrf,
            user=session.account.name,
            role=session.account.role,
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request)
        if session is None:
            return self._refuse("unauthenticated", 401)
        client = Client(session.account.role)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        self._clients.add(client)
        self.metrics.clients.inc()
        try:
            await resp.write(b": connected\n\n")
            if request.headers.get("Last-Event-ID") is not None:
                # a reconnect (EventSource sends the last id it saw): what changed meanwhile
                # is unknown, so every listed row again, oldest first (the page prepends new
                # ones, replaces known ones)
                for listed in reversed(self.worklist.newest()):
                    await self._send_row(resp, listed, session)
            while client in self._clients and self._valid(request, session):
                try:
                    alert_id = await asyncio.wait_for(client.queue.get(), timeout=15.0)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if alert_id == _END:
                    break
                entry = self.worklist.get(alert_id)
                if entry is None:
                    continue
                await self._send_row(resp, entry, session)
                lag = (utcnow() - entry.alert.created_at).total_seconds()
                self.metrics.push.observe(max(0.0, lag))
        except ConnectionResetError:
            pass  # the browser went away: nothing to clean but below
        finally:
            self._clients.discard(client)
            self.metrics.clients.dec()
        return resp

    async def _send_row(self, resp: web.StreamResponse, entry: Entry, session: Session) -> None:
        self._event_id += 1
        html = await self._row(entry, session)
        data = json.dumps({"id": entry.alert.alert_id, "html": html})
        await resp.write(f"id: {self._event_id}\nevent: row\ndata: {data}\n\n".encode())

    async def _ack(self, request: web.Request, session: Session) -> web.StreamResponse:
        entry = self.worklist.get(request.match_info["alert_id"])
        if entry is None:
            return self._refuse("unknown_alert", 404)
        account = session.account
        if not entry.acks:
            ack = new_ack(entry, account.name, account.role, self.source)
            await self.backend.acknowledge(entry, ack)  # on the broker before we say so
            self.worklist.add_ack(ack)
            self.metrics.acks.inc()
            log.info("alert acknowledged role=%s", account.role)
            self.changed(entry.alert.alert_id)
        if "application/json" in request.headers.get("Accept", ""):
            html = await self._row(entry, session)
            return web.json_response({"acked": True, "html": html})
        return _redirect("/")

    async def _overlay(self, request: web.Request) -> web.StreamResponse:
        if self._session(request) is None:
            return self._refuse("unauthenticated", 401)
        entry = self.worklist.get(request.match_info["alert_id"])
        try:
            n = int(request.match_info["n"])
        except ValueError:
            n = -1
        if entry is None or entry.results is None or not 0 <= n < len(entry.results.overlays):
            return self._refuse("no_such_picture", 404)
        ref = entry.results.overlays[n].blob
        png = await asyncio.to_thread(self.backend.blob, ref)
        return web.Response(body=png, content_type="image/png")

"""The approval page at ``/ui`` on the admin listener: plain server-rendered forms, no script.

The admin plane's bearer middleware lets ``/ui`` through, so the page checks its own way in:

- with ``admin.token`` set, ``/ui/login`` trades the token for a signed session cookie
  (HttpOnly, SameSite=Strict, 12 h); a notification's signed link
  (``/ui/approvals/{id}?t=...``, purpose ``approval-page``) opens that one approval, and lets
  it be decided, without signing in;
- without one (a loopback-only admin plane), anyone who reaches the page may use it.

Every POST carries a CSRF token bound to what lets it in (an HMAC of the session cookie, the
sign-in cookie or the link's token), and a cross-site POST is refused outright. Every value
shown is escaped; the page loads nothing from elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from proxy.approvals import templates as html
from proxy.approvals.gate import PAGE_PURPOSE, Approvals
from proxy.approvals.model import BadToken, State, sign, verify
from proxy.http.keys import CONFIG, DEPS
from proxy.tracing.base import CallQuery

logger = logging.getLogger(__name__)

SESSION_COOKIE, SESSION_PURPOSE, SESSION_TTL_S = "handrail_ui", "ui-session", 12 * 3600.0
LOGIN_COOKIE, LOGIN_PURPOSE, LOGIN_TTL_S = "handrail_ui_login", "ui-login", 3600.0
FLASH_PURPOSE, FLASH_TTL_S = "ui-flash", 300.0
SHOWN_PENDING, SHOWN_DECIDED, SHOWN_RUN_CALLS, RECENT_CALLS = 50, 10, 30, 200

COOKIE: dict[str, Any] = {"path": "/ui", "httponly": True, "samesite": "Strict"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True, slots=True)
class Access:
    """Who is in and on what grounds: ``by`` is recorded as the decider; ``binding`` is what
    the CSRF token is bound to; ``link`` the signed link's token, carried along."""

    by: str
    binding: str
    link: str | None = None
    new_cookie: bool = False


class Pages:
    def __init__(self, data_app: web.Application) -> None:
        self.data_app = data_app

    @property
    def approvals(self) -> Approvals:
        return self.data_app[DEPS].approvals

    @property
    def token(self) -> str | None:
        return self.data_app[CONFIG].admin.token

    # -- who is in ----------------------------------------------------------------------

    def _token_tag(self) -> str:
        """Binds a session to the admin token: changing the token ends every session."""
        return hashlib.sha256(b"ui\0" + (self.token or "").encode()).hexdigest()[:16]

    def _new_session(self) -> str:
        claims = {"sid": secrets.token_hex(16), "tok": self._token_tag()}
        return sign(self.approvals.key, SESSION_PURPOSE, claims, SESSION_TTL_S)

    def _session(self, request: web.Request) -> str | None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        try:
            claims = verify(self.approvals.key, SESSION_PURPOSE, cookie)
        except BadToken:
            return None
        return cookie if claims.get("tok") == self._token_tag() else None

    def _viewer(self, request: web.Request, *, issue: bool) -> Access | None:
        """A signed-in person; with no admin token, anyone (``issue``: a fresh session)."""
        session = self._session(request)
        if session is not None:
            return Access("ui", session)
        if self.token is None and issue:
            return Access("ui", self._new_session(), new_cookie=True)
        return None

    def _link(self, request: web.Request, approval_id: str) -> Access | None:
        link = request.query.get("t", "")
        try:
            claims = verify(self.approvals.key, PAGE_PURPOSE, link)
        except BadToken:
            return None
        return Access("ui:link", link, link) if claims.get("id") == approval_id else None

    def _csrf(self, binding: str) -> str:
        return hmac.new(self.approvals.key, b"ui-csrf\0" + binding.encode(), "sha256").hexdigest()

    def _csrf_ok(self, request: web.Request, form: MultiDictProxy[Any], binding: str) -> bool:
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False  # a browser says another site sent this form
        given = form.get("csrf")
        return isinstance(given, str) and hmac.compare_digest(given, self._csrf(binding))

    # -- pages --------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        access = self._viewer(request, issue=True)
        if access is None:
            return _redirect("/ui/login")
        store = self.approvals.store
        waiting = await store.list(State.PENDING, SHOWN_PENDING)
        recent = await store.list(None, SHOWN_PENDING + SHOWN_DECIDED * 3)
        decided = [a for a in recent if a.shown_state() is not State.PENDING][:SHOWN_DECIDED]
        calls = await self._calls(CallQuery(limit=RECENT_CALLS))
        content = html.index(waiting, decided, calls, self._csrf(access.binding))
        return self._page(request, access, "Approvals", content)

    async def approval(self, request: web.Request) -> web.StreamResponse:
        approval_id = request.match_info["id"]
        access = self._viewer(request, issue=True) or self._link(request, approval_id)
        if access is None:
            if "t" in request.query:
                return _problem(403, "This link has expired or is for another approval.")
            return _redirect("/ui/login")
        approval = await self.approvals.store.get(approval_id)
        if approval is None:
            return _problem(404, f"There is no approval {approval_id}.")
        calls: list[dict[str, Any]] = []
        if approval.run_id:
            calls = await self._calls(CallQuery(run_id=approval.run_id, limit=SHOWN_RUN_CALLS))
        action = _detail_url(approval_id, access.link)
        content = html.detail(approval, self._csrf(access.binding), action, calls)
        return self._page(request, access, f"Approval {approval_id}", content)

    async def decide(self, request: web.Request) -> web.StreamResponse:
        approval_id = request.match_info["id"]
        access = self._viewer(request, issue=False) or self._link(request, approval_id)
        form = await request.post()
        if access is None or not self._csrf_ok(request, form, access.binding):
            return _problem(403, "This form has expired or was not sent from this page.")
        decision, reason = form.get("decision"), str(form.get("reason") or "").strip()
        if decision not in ("approve", "reject") or len(reason) > html.MAX_REASON:
            return _problem(400, f"Approve or reject, with a reason of {html.MAX_REASON} at most.")
        approve = decision == "approve"
        approval, changed = await self.approvals.decide(
            approval_id, approve, access.by, reason or None
        )
        if approval is None:
            return _problem(404, f"There is no approval {approval_id}.")
        if changed:
            done = "Approved" if approve else "Rejected"
            flash = {"m": f"{done} {approval_id}: {html.heading(approval)}.", "k": "ok"}
        else:
            state, by = approval.shown_state().value, approval.decided_by
            told = f"{approval_id} is already {state}" + (f" (by {by})" if by else "")
            flash = {"m": told + ": nothing changed.", "k": "warn"}
        back = "/ui" if form.get("back") == "list" and access.link is None else None
        location = back or _detail_url(approval_id, access.link)
        token = sign(self.approvals.key, FLASH_PURPOSE, flash, FLASH_TTL_S)
        return _redirect(location + ("&" if "?" in location else "?") + "flash=" + token)

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.token is None or self._session(request) is not None:
            return _redirect("/ui")
        return self._login_page(request, 200, "")

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self.token is None:
            return _redirect("/ui")
        form = await request.post()
        started = request.cookies.get(LOGIN_COOKIE, "")
        try:
            verify(self.approvals.key, LOGIN_PURPOSE, started)
        except BadToken:
            return _problem(403, "The sign-in form expired: open /ui/login again.")
        if not self._csrf_ok(request, form, started):
            return _problem(403, "This form has expired or was not sent from this page.")
        given = str(form.get("token") or "").encode()
        if not hmac.compare_digest(given, self.token.encode()):
            logger.warning("approval page: a sign-in with a wrong admin token")
            return self._login_page(request, 401, "That is not the admin token.")
        response = _redirect("/ui")
        _set_cookie(request, response, SESSION_COOKIE, self._new_session(), SESSION_TTL_S)
        response.del_cookie(LOGIN_COOKIE, path="/ui")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        access = self._viewer(request, issue=False)
        form = await request.post()
        if access is None or not self._csrf_ok(request, form, access.binding):
            return _problem(403, "This form has expired or was not sent from this page.")
        response = _redirect("/ui/login" if self.token else "/ui")
        response.del_cookie(SESSION_COOKIE, path="/ui")
        return response

    # -- rendering with state ------------------------------------------------------------

    async def _calls(self, query: CallQuery) -> list[dict[str, Any]]:
        journal = self.data_app[DEPS].journal
        await journal.flush()
        return await journal.query(query)

    def _login_page(self, request: web.Request, status: int, error: str) -> web.Response:
        started = sign(self.approvals.key, LOGIN_PURPOSE, {"n": secrets.token_hex(8)}, LOGIN_TTL_S)
        response = _html(html.page("Sign in", html.login(self._csrf(started), error)), status)
        _set_cookie(request, response, LOGIN_COOKIE, started, LOGIN_TTL_S)
        return response

    def _page(self, request: web.Request, access: Access, title: str, content: str) -> web.Response:
        signed_in = self.token is not None and access.link is None
        nav = html.nav(self._csrf(access.binding)) if signed_in else ""
        response = _html(html.page(title, content, nav=nav, flash=self._flash(request)))
        if access.new_cookie:
            _set_cookie(request, response, SESSION_COOKIE, access.binding, SESSION_TTL_S)
        return response

    def _flash(self, request: web.Request) -> str:
        try:
            claims = verify(self.approvals.key, FLASH_PURPOSE, request.query.get("flash", ""))
        except BadToken:
            return ""
        return html.flash(str(claims.get("m")), "ok" if claims.get("k") == "ok" else "warn")


# -- responses --------------------------------------------------------------------------


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _problem(status: int, message: str) -> web.Response:
    return _html(html.problem(status, message), status)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, ttl_s: float
) -> None:
    response.set_cookie(name, value, max_age=int(ttl_s), secure=request.secure, **COOKIE)


def _detail_url(approval_id: str, link: str | None) -> str:
    return f"/ui/approvals/{approval_id}" + (f"?t={link}" if link else "")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/ui" or request.path.startswith("/ui/"):
        response.headers.update(SECURITY_HEADERS)


def add_routes(app: web.Application, data_app: web.Application) -> None:
    """Register ``/ui`` routes; they check their own way in (cookie or signed link)."""
    pages = Pages(data_app)
    app.router.add_get("/ui", pages.index)
    app.router.add_get("/ui/login", pages.login_form)
    app.router.add_post("/ui/login", pages.login)
    app.router.add_post("/ui/logout", pages.logout)
    app.router.add_get("/ui/approvals/{id}", pages.approval)
    app.router.add_post("/ui/approvals/{id}", pages.decide)
    app.on_response_prepare.append(_security_headers)

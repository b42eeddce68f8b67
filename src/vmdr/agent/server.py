"""The agent process: the scheduling loop and the HTTP server (API, dashboard, /metrics) on
one asyncio loop, authentication in one middleware.

Credentials: ``Authorization: Bearer <token>`` for the API, or the dashboard's session
cookie (HttpOnly, SameSite=Strict, Secure over HTTPS) plus a CSRF token on every form POST.
Failed logins and bad tokens are rate-limited per client address. Neither tokens nor
passwords are ever logged: the access log shows method, path and status only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vmdr.agent import api, metrics, web, web_ha, web_recovery, web_replicas, web_tape
from vmdr.agent.auth import Principal, check_token
from vmdr.agent.clock import wall
from vmdr.agent.daemon import Agent
from vmdr.config import Config
from vmdr.errors import UsageError

log = logging.getLogger("vmdr.agent")

SESSION_COOKIE = "vmdr_session"
SESSION_TTL = 12 * 3600.0


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float


class Sessions:
    """Dashboard sessions, in memory (a restart logs everyone out, by design)."""

    def __init__(self) -> None:
        self._s: dict[str, Session] = {}

    def create(self, p: Principal) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        s = Session(p, secrets.token_urlsafe(24), wall() + SESSION_TTL)
        self._s[sid] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        s = self._s.get(sid or "")
        if s is None or s.expires < wall():
            self._s.pop(sid or "", None)
            return None
        return s

    def drop(self, sid: str | None) -> None:
        self._s.pop(sid or "", None)


class RateLimit:
    """At most *limit* failures per *window* seconds per client address."""

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._f: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, who: str) -> bool:
        q = self._f[who]
        now = time.monotonic()
        while q and q[0] < now - self.window:
            q.popleft()
        return len(q) >= self.limit

    def failed(self, who: str) -> None:
        self._f[who].append(time.monotonic())


_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                 b"style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"),
]
TOKEN_CACHE_S = 5.0  # a revoked token stops working within this


class AuthMiddleware:
    """Plain ASGI (no per-request task or stream copies): credentials → scope state,
    CSRF on session form posts, security headers on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._tokens: dict[str, tuple[float, Principal | None]] = {}

    async def _token(self, st: Any, token: str) -> Principal | None:
        now = time.monotonic()
        hit = self._tokens.get(token)
        if hit and now - hit[0] < TOKEN_CACHE_S:
            return hit[1]
        p = await asyncio.to_thread(check_token, st.agent.history, token)
        if len(self._tokens) > 1000:
            self._tokens.clear()
        if p is not None:
            self._tokens[token] = (now, p)
        return p

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        st = request.app.state
        state = scope.setdefault("state", {})
        state["principal"] = None
        state["session"] = None
        auth = request.headers.get("authorization", "")

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in _SECURITY_HEADERS if k not in names]
            await send(message)

        if auth and scope["path"] == "/metrics" and _metrics_token(st, auth):
            state["metrics"] = True  # the scrape token: good for /metrics only
        elif auth:
            who = api.client_addr(request)
            if st.limiter.blocked(who):
                await JSONResponse({"error": "too many failed attempts; wait a minute"},
                                   status_code=429, headers={"Retry-After": "60"}
                                   )(scope, receive, send_secure)
                return
            scheme, _, token = auth.partition(" ")
            p = await self._token(st, token.strip()) if scheme.lower() == "bearer" else None
            if p is None:
                st.limiter.failed(who)
                await JSONResponse({"error": "invalid or expired token"}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"}
                                   )(scope, receive, send_secure)
                return
            state["principal"] = p
        else:
            sess = st.sessions.get(request.cookies.get(SESSION_COOKIE))
            if sess is not None:
                if request.method not in ("GET", "HEAD", "OPTIONS"):
                    sent = request.headers.get("x-csrf-token")
                    if sent is None and request.headers.get("content-type", "").startswith(
                            "application/x-www-form-urlencoded"):
                        body = await request.body()
                        sent = parse_qs(body.decode("latin-1")).get("csrf", [""])[0]
                        receive = _replay(body)
                    if not sent or not secrets.compare_digest(sent, sess.csrf):
                        await PlainTextResponse("CSRF token missing or wrong", 403
                                                )(scope, receive, send_secure)
                        return
                state["principal"] = sess.principal
                state["session"] = sess
        await self.app(scope, receive, send_secure)


def _replay(body: bytes) -> Receive:
    """A receive() that hands the already-read *body* to the app once more."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.ApiError)
    if request.url.path.startswith("/api/") or exc.status not in (401, 403):
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return web.auth_failed(request, exc.status)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__,
              exc)
    return JSONResponse({"error": "internal error (see the agent's log)"}, status_code=500)


def _metrics_token(st: Any, auth: str) -> bool:
    want = st.agent.cfg.agent.metrics_token
    scheme, _, token = auth.partition(" ")
    return bool(want) and scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), want.encode())


def metrics_open(request: Request) -> bool:
    """/metrics without credentials: only on loopback, and only with no metrics token set.
    Otherwise the scrape token (``metrics_token_file``) or any auditor credential."""
    a: Agent = request.app.state.agent
    if request.scope.get("state", {}).get("metrics"):
        return True
    p: Principal | None = request.scope.get("state", {}).get("principal")
    if p is not None and p.can("auditor"):
        return True
    host = a.cfg.agent.listen.rpartition(":")[0].strip("[]")
    return a.cfg.agent.metrics_token is None and is_loopback(host)


def metrics_endpoint(request: Request) -> Response:
    a: Agent = request.app.state.agent
    if not metrics_open(request):
        return PlainTextResponse("metrics need a bearer token (agent.metrics_token_file, or "
                                 "an auditor token)\n", 401,
                                 headers={"WWW-Authenticate": "Bearer"})
    return PlainTextResponse(metrics.render(a),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(agent: Agent, secure_cookies: bool = False) -> Starlette:
    routes: list[Any] = [
        *api.routes,
        Route("/metrics", metrics_endpoint),
        Mount("/static", app=StaticFiles(directory=web.STATIC), name="static"),
        *web.routes,
        *web_replicas.routes,
        *web_tape.routes,
        *web_ha.routes,
        *web_recovery.routes,
    ]
    app = Starlette(routes=routes, middleware=[Middleware(AuthMiddleware)],
                    exception_handlers={api.ApiError: _api_error, Exception: _internal})
    app.state.agent = agent
    app.state.sessions = Sessions()
    app.state.limiter = RateLimit()
    app.state.secure_cookies = secure_cookies
    return app


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_address(cfg: Config) -> tuple[str, int, bool]:
    """(host, port, tls); UsageError when listening off loopback without a certificate."""
    host, _, port = cfg.agent.listen.rpartition(":")
    host = host.strip("[]")
    tls = bool(cfg.agent.tls_cert)
    if not is_loopback(host) and not tls:
        raise UsageError(f"agent.listen = {cfg.agent.listen!r} is not loopback: set "
                         "agent.tls_cert and agent.tls_key (HTTPS is required off loopback)")
    return host, int(port), tls


class _Server:
    """uvicorn without its own signal handling: the agent owns SIGTERM/SIGHUP."""

    def __init__(self, app: Starlette, host: str, port: int, cfg: Config) -> None:
        import uvicorn

        ucfg = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                              ssl_certfile=cfg.agent.tls_cert, ssl_keyfile=cfg.agent.tls_key,
                              lifespan="off", server_header=False, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(ucfg)

        @contextlib.contextmanager
        def no_signals() -> Iterator[None]:
            yield

        self.server.capture_signals = no_signals  # type: ignore[method-assign]

    async def serve(self) -> None:
        try:
            await self.server.serve()
        except SystemExit:  # uvicorn's way of saying it could not start (e.g. port in use)
            raise OSError("the HTTP server did not start (address in use?)") from None

    def stop(self) -> None:
        self.server.should_exit = True


async def serve(agent: Agent, ready: Callable[[str], None] | None = None) -> None:
    host, port, tls = listen_address(agent.cfg)
    app = build_app(agent, secure_cookies=tls)
    srv = _Server(app, host, port, agent.cfg)
    agent.install_signals()
    http = asyncio.create_task(srv.serve())
    url = f"{'https' if tls else 'http'}://{host}:{port}/"
    for _ in range(200):
        if srv.server.started or http.done():
            break
        await asyncio.sleep(0.05)
    if http.done() or not srv.server.started:
        srv.stop()
        exc = http.exception() if http.done() else None
        raise UsageError(f"cannot listen on {agent.cfg.agent.listen}: {exc or 'timed out'}")
    loop_task = asyncio.create_task(agent.run())
    log.info("serving the API and dashboard on %s", url)
    if ready:
        ready(url)
    await agent.stopping.wait()
    log.info("stopping: waiting for running jobs to end")
    srv.stop()
    await asyncio.gather(http, loop_task, return_exceptions=True)


def run_agent(cfg: Config) -> int:
    """``vmdr agent``: run until SIGTERM/SIGINT. Bad config → UsageError before anything."""
    listen_address(cfg)
    root = logging.getLogger("vmdr")
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmdr-agent: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    agent = Agent(cfg)
    asyncio.run(serve(agent, lambda url: print(f"vmdr agent: dashboard at {url}",
                                               file=sys.stderr, flush=True)))
    return 0

"""Dashboard sign-in: server-side sessions behind an HttpOnly cookie, and CSRF tokens.

A session is a random id in the ``kiln_session`` cookie that maps, in this process's
memory, to the API key that signed in (and, for a global admin key, the project it
picked). The key is checked again on every request through the API's own
authentication, so a revoked key ends its sessions at once. Sessions live in memory
only: restarting the server signs everyone out, and each server of a group keeps its
own (a load balancer needs sticky sessions).

CSRF: every POST form carries the session's token in a hidden ``csrf`` field, compared
with :func:`hmac.compare_digest`; the sign-in form, which has no session yet, uses a
double-submit cookie (``kiln_login_csrf``) instead. The session cookie is
``HttpOnly; SameSite=Strict; Path=/`` and ``Secure`` when the request came over https.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import Request, Response

from kiln.errors import AuthError, ForbiddenError
from kiln.services import STATIC_PRINCIPAL, Services
from kiln.store.keys import Principal, authenticate

COOKIE = "kiln_session"
LOGIN_COOKIE = "kiln_login_csrf"
CSRF_FIELD = "csrf"
IDLE_SECONDS = 8 * 3600  # a session unused this long ends
MAX_AGE_SECONDS = 24 * 3600  # and any session ends this long after sign-in
LOGIN_FORM_SECONDS = 3600  # how long a sign-in form may stay open
MAX_SESSIONS = 10_000  # past this, the least recently used sessions end first


@dataclass
class WebSession:
    """One signed-in browser."""

    token: str  # the API key, re-checked on every request
    project: str | None  # the project a global admin key picked; None: the key's own / default
    csrf: str
    created: float  # time.monotonic()
    seen: float


class SessionStore:
    """Sessions by the SHA-256 of their cookie value, in memory, thread-safe."""

    def __init__(self) -> None:
        self._sessions: OrderedDict[str, WebSession] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token: str, project: str | None) -> str:
        """Start a session; returns the cookie value (shown to nobody else)."""
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.popitem(last=False)
            self._sessions[_digest(sid)] = WebSession(
                token=token, project=project, csrf=secrets.token_urlsafe(32), created=now, seen=now
            )
        return sid

    def get(self, sid: str | None) -> WebSession | None:
        """The live session behind a cookie value, or None (unknown or expired)."""
        if not sid:
            return None
        key = _digest(sid)
        now = time.monotonic()
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                return None
            if now - found.seen > IDLE_SECONDS or now - found.created > MAX_AGE_SECONDS:
                del self._sessions[key]
                return None
            found.seen = now
            self._sessions.move_to_end(key)
            return found

    def end(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_digest(sid), None)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def check_key(svc: Services, token: str) -> Principal:
    """The key's principal, exactly as the API's bearer authentication decides it.

    Uses the same short-lived cache (cleared by a revocation on this server) and
    raises :class:`AuthError` with the API's one generic message.
    """
    token = token.strip()
    if not token:
        raise AuthError("invalid or missing API key")
    who = svc.keys.get(token)
    if who is None:
        if svc.static_key is not None and hmac.compare_digest(token, svc.static_key):
            who = STATIC_PRINCIPAL
        else:
            with svc.db.session() as s:
                who = authenticate(s, token)
        svc.keys.put(token, who)
    return who


def check_csrf(expected: str | None, given: object) -> None:
    """403 unless ``given`` (a form field) equals the ``expected`` token."""
    if (
        not expected
        or not isinstance(given, str)
        or not hmac.compare_digest(expected.encode(), given.encode())
    ):
        raise ForbiddenError(
            "the form's security token is missing or wrong; reload the page and try again",
            field=CSRF_FIELD,
        )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, sid: str) -> None:
    response.set_cookie(
        COOKIE,
        sid,
        max_age=MAX_AGE_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request)
    )


def set_login_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_FORM_SECONDS,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_login_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        LOGIN_COOKIE, path="/login", httponly=True, samesite="strict", secure=_secure(request)
    )

"""The services one server process shares: database, artifact store, job queue, the
cache of recently seen keys, and the rate limiter.

The API, the dashboard and the wiring (``kiln up``, ``kiln serve``) all take one
:class:`Services`; :func:`kiln.app.build_services` builds it from the settings, and
tests build their own over a temporary home. This module sits below ``kiln.api``:
the limiter is named by the :class:`RequestLimiter` protocol, so it imports nothing
of the HTTP layer (``kiln.api.ratelimit.RateLimits`` is the implementation).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.orm import Session

from kiln.jobs.queue import Queue
from kiln.settings import Settings
from kiln.store.artifacts import ArtifactStore
from kiln.store.db import Database
from kiln.store.keys import Principal

STATIC_PRINCIPAL = Principal(
    key_id="static", project_id=1, project="default", scopes=frozenset({"predict", "read"})
)
"""The principal of ``kiln serve``'s single key: predict and read in the default project."""


class RequestLimiter(Protocol):
    """Counts requests per key and per project; refuses those past a limit."""

    async def check(self, who: Principal, lane: str) -> None:
        """Count one request of ``who`` on ``lane``; raise RateLimitError past a limit."""

    def invalidate_on_commit(self, session: Session) -> None:
        """The projects' limits change when ``session`` commits: read them again then."""


class KeyCache:
    """Principals of recently seen keys, for a few seconds.

    Inference requests would otherwise read (and on SQLite, lock) the database once
    each. Revoking a key clears the cache of this server at once; other servers
    sharing the database see it within ``ttl`` seconds.
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, token: str) -> Principal | None:
        entry = self._entries.get(_digest(token))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token: str, who: Principal) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[_digest(token)] = (who, time.monotonic() + self.ttl)

    def clear(self) -> None:
        self._entries.clear()


def _digest(token: str) -> str:
    # the cache holds no key in the clear
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Services:
    """Everything a request may use; built once per app."""

    settings: Settings
    db: Database
    store: ArtifactStore
    queue: Queue
    rate: RequestLimiter  # from the settings' KILN_RATE_LIMIT_* and the projects' quotas
    keys: KeyCache = field(default_factory=KeyCache)
    static_key: str | None = None  # ``kiln serve --api-key``: a predict/read key for one bundle

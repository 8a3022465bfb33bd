"""API keys: issued once, stored hashed, checked in constant time, scoped per project.

A key reads ``kiln_<id>_<secret>``. The id is public (it appears in the audit log);
the secret is 32 random bytes and only its SHA-256 is stored. A salted slow hash
(argon2/bcrypt) protects low-entropy passwords; a 256-bit random secret gains
nothing from it and would slow every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.errors import AuthError, ForbiddenError, NotFoundError, SpecError
from kiln.store.tables import ApiKey, Project, utcnow

SCOPES = ("admin", "read", "train", "deploy", "predict")
"""``admin`` implies every other scope."""

_KEY = re.compile(r"^kiln_([a-f0-9]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id, its project (None for a global admin key) and scopes."""

    key_id: str
    project_id: int | None
    project: str | None
    scopes: frozenset[str]

    @property
    def is_global_admin(self) -> bool:
        return self.project_id is None and "admin" in self.scopes

    def require(self, scope: str) -> None:
        """Raise 403 unless the key holds ``scope`` (or ``admin``)."""
        if scope not in self.scopes and "admin" not in self.scopes:
            raise ForbiddenError(f"this API key lacks the '{scope}' scope", field="scopes")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise SpecError(
            f"scopes must be a non-empty subset of {', '.join(SCOPES)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
            field="scopes",
        )
    return sorted(set(scopes))


def create_key(
    session: Session, *, project_id: int | None, scopes: list[str], name: str = ""
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its full secret (shown to the caller once)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id,
        secret_hash=_hash(secret),
        name=name,
        project_id=project_id,
        scopes=check_scopes(scopes),
    )
    session.add(row)
    session.flush()
    return row, f"kiln_{key_id}_{secret}"


def authenticate(session: Session, token: str | None) -> Principal:
    """The principal behind a bearer token; 401 for missing, malformed, unknown or revoked.

    The message never says which part was wrong.
    """
    match = _KEY.match(token or "")
    row = session.get(ApiKey, match.group(1)) if match else None
    # compare even when there is no row, so timing does not tell unknown ids from bad secrets
    expected = row.secret_hash if row is not None else "0" * 64
    given = _hash(match.group(2)) if match else ""
    if row is None or not hmac.compare_digest(expected, given) or row.revoked_at is not None:
        raise AuthError("invalid or missing API key")
    project = session.get(Project, row.project_id) if row.project_id is not None else None
    now = utcnow()
    # a write per request would serialise reads on SQLite; minute resolution is plenty
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        row.last_used_at = now
    return Principal(
        key_id=row.id,
        project_id=row.project_id,
        project=project.name if project else None,
        scopes=frozenset(row.scopes),
    )


def revoke(session: Session, principal: Principal, key_id: str) -> ApiKey:
    """Revoke a key; a project admin may only revoke keys of its own project."""
    row = session.get(ApiKey, key_id)
    if row is None or (not principal.is_global_admin and row.project_id != principal.project_id):
        raise NotFoundError(f"API key {key_id} not found", field="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def list_keys(session: Session, principal: Principal) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if not principal.is_global_admin:
        query = query.where(ApiKey.project_id == principal.project_id)
    return list(session.scalars(query))

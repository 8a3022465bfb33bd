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

from kiln.errors import AuthError, ConflictError, ForbiddenError, NotFoundError, SpecError
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


def revoke(
    session: Session, principal: Principal, key_id: str, *, confirm_self: bool = False
) -> ApiKey:
    """Revoke a key; a project admin may only revoke keys of its own project.

    Two revocations that would lock people out are refused with 409: the key the request
    is made with, unless ``confirm_self``; and the last active global admin key (nobody
    could create projects or keys again but by editing the database). Revoking a key
    that is already revoked changes nothing and is allowed.
    """
    row = session.get(ApiKey, key_id)
    if row is None or (not principal.is_global_admin and row.project_id != principal.project_id):
        raise NotFoundError(f"API key {key_id} not found", field="key_id")
    if row.revoked_at is not None:
        return row
    if row.id == principal.key_id and not confirm_self:
        raise ConflictError(
            f"key {key_id} is the key this request is made with; revoking it locks you out. "
            f"To do it anyway, confirm: kiln keys revoke {key_id} --yes "
            "(API: ?confirm_self=true)",
            field="confirm_self",
        )
    if row.project_id is None and "admin" in row.scopes and not _other_global_admins(session, row):
        raise ConflictError(
            f"key {key_id} is the last active global admin key; without one nobody can "
            "manage projects and keys. Create another first: kiln keys create --scope admin "
            "(with no --project and KILN_PROJECT unset), then revoke this one",
            field="key_id",
        )
    row.revoked_at = utcnow()
    return row


def _other_global_admins(session: Session, row: ApiKey) -> int:
    """Active global admin keys but ``row``, locked until the transaction ends (on
    PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers already), so two concurrent
    revocations cannot each count the other and leave none."""
    query = (
        select(ApiKey)
        .where(ApiKey.project_id.is_(None), ApiKey.revoked_at.is_(None))
        .with_for_update()
    )
    return sum(1 for key in session.scalars(query) if key.id != row.id and "admin" in key.scopes)


def list_keys(session: Session, principal: Principal) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if not principal.is_global_admin:
        query = query.where(ApiKey.project_id == principal.project_id)
    return list(session.scalars(query))

"""The audit log: who did what to which resource, and how it ended.

Every mutating API call is recorded, refused ones included (a 401 has no key id).
Rows are only ever appended.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kiln.store.keys import Principal
from kiln.store.tables import AuditEvent


def record(
    session: Session,
    *,
    action: str,
    target: str,
    outcome: str,
    status: int,
    key_id: str | None,
    project_id: int | None,
) -> None:
    session.add(
        AuditEvent(
            action=action[:64],
            target=target[:256],
            outcome=outcome[:64],
            status=status,
            key_id=key_id,
            project_id=project_id,
        )
    )


def list_events(
    session: Session, principal: Principal, *, limit: int, offset: int
) -> tuple[list[AuditEvent], int]:
    """Newest first; a project admin sees its own project's events only."""
    where = [] if principal.is_global_admin else [AuditEvent.project_id == principal.project_id]
    total = session.scalar(select(func.count()).select_from(AuditEvent).where(*where)) or 0
    rows = session.scalars(
        select(AuditEvent).where(*where).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    )
    return list(rows), total

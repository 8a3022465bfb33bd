"""The audit log (scope ``admin``)."""

from __future__ import annotations

from fastapi import APIRouter

from kiln.api.deps import Admin, PageDep, SessionDep
from kiln.api.schemas import AuditOut, Page, page_of
from kiln.monitor.audit import list_events

router = APIRouter(tags=["audit"])


@router.get("/audit", name="audit.list")
def list_(who: Admin, s: SessionDep, page: PageDep) -> Page[AuditOut]:
    rows, total = list_events(s, who, limit=page.limit, offset=page.offset)
    items = [AuditOut.model_validate(r, from_attributes=True) for r in rows]
    return Page[AuditOut](**page_of(items, total, page.limit, page.offset))

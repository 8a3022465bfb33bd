"""The model registry: named models, numbered immutable versions, movable aliases.

A version is a bundle in the artifact store plus what it came from (job, dataset,
parent version for compressed variants) and its metrics. Version numbers count up
per model from 1; aliases (``production``, ``staging``, ...) point at one version.
Registering a version meters its size (a ``stored_bytes`` usage event, same transaction).
Version numbers are taken by ``max + 1``, so two registrations of one model can race for
the same number; :func:`registering` runs a registration's transaction again when it
lost, and raises once its attempts are spent: every registration goes through it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kiln.errors import ConflictError, NotFoundError, SpecError
from kiln.store.db import Database
from kiln.store.projects import check_name
from kiln.store.tables import Alias, Model, ModelVersion, Project, UsageEvent, utcnow

T = TypeVar("T")

# Transactions a registration may take: each loses only to a registration that committed
# in the meantime, so running out of them means a storm of them on one model.
REGISTER_ATTEMPTS = 3


class VersionTaken(ConflictError):  # noqa: N818 - a state, retried, like LeaseLost
    """A concurrent registration took the version number (or created the model) first;
    :func:`registering` retries this in a new transaction."""


def get_model(session: Session, project: Project, name: str) -> Model:
    row = session.scalar(select(Model).where(Model.project_id == project.id, Model.name == name))
    if row is None:
        raise NotFoundError(f"model {name!r} not found", field="name")
    return row


def register_version(
    session: Session,
    project: Project,
    name: str,
    *,
    artifact_key: str,
    task: str,
    metrics: dict[str, Any],
    summary: dict[str, Any],
    size_bytes: int,
    job_id: str | None = None,
    dataset_id: str | None = None,
    parent_id: str | None = None,
) -> ModelVersion:
    """Add the next version of model ``name`` (created on first use).

    Raises :class:`VersionTaken` when a concurrent registration won the number; the
    transaction is then unusable: call this inside :func:`registering`, which retries.
    """
    check_name(name, field="spec.name", what="model name")
    model = session.scalar(select(Model).where(Model.project_id == project.id, Model.name == name))
    if model is None:
        model = Model(project_id=project.id, name=name)
        session.add(model)
        try:
            session.flush()
        except IntegrityError:
            # another registration created the model first; the next attempt finds it
            raise VersionTaken(f"model {name!r} was just created", field="name") from None
    latest = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    )
    row = ModelVersion(
        id="mv_" + secrets.token_hex(8),
        model_id=model.id,
        version=(latest or 0) + 1,
        artifact_key=artifact_key,
        task=task,
        metrics=metrics,
        summary=summary,
        size_bytes=size_bytes,
        job_id=job_id,
        dataset_id=dataset_id,
        parent_id=parent_id,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        # Two registrations raced for the same number (PostgreSQL); the caller retries.
        raise VersionTaken(
            f"version {row.version} of {name!r} was just taken", field="name"
        ) from None
    if size_bytes > 0:
        session.add(
            UsageEvent(
                project_id=project.id,
                kind="stored_bytes",
                quantity=float(size_bytes),
                subject=row.id,
            )
        )
    return row


def registering(
    db: Database,
    name: str,
    work: Callable[[Session], T],
    *,
    attempts: int = REGISTER_ATTEMPTS,
) -> T:
    """``work(session)`` in a transaction of its own; what it returns once it committed.

    ``work`` registers one or more versions of model ``name`` with
    :func:`register_version`, together with whatever must commit with them (the job's
    end). A lost version-number race rolls everything back and runs ``work`` again, in
    a new transaction, up to ``attempts`` times; then :class:`ConflictError` (409,
    exit 12) is raised and nothing was registered. Any other error propagates at once.
    """
    for _ in range(attempts):
        try:
            with db.session() as session:
                return work(session)
        except VersionTaken:
            continue
    raise ConflictError(
        f"could not register a version of model {name!r}: {attempts} concurrent "
        "registrations took its next version number first; try again",
        field="name",
    )


def resolve_version(session: Session, model: Model, ref: str | int) -> ModelVersion:
    """A version by number (``3``, ``"3"``, ``"v3"``), ``"latest"`` or an alias."""
    text = str(ref)
    if text == "latest":
        text = str(latest_version(session, model) or 0)
    number = text[1:] if text[:1] == "v" and text[1:].isdigit() else text
    if number.isascii() and number.isdigit():
        # past nine digits it is no version (and past the engines' INTEGER): not found
        row = (
            None
            if len(number) > 9
            else session.scalar(
                select(ModelVersion).where(
                    ModelVersion.model_id == model.id, ModelVersion.version == int(number)
                )
            )
        )
    else:
        alias = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == text))
        row = session.get(ModelVersion, alias.version_id) if alias else None
    if row is None:
        raise NotFoundError(f"model {model.name!r} has no version {text!r}", field="version")
    return row


def set_alias(session: Session, model: Model, alias: str, ref: str | int) -> Alias:
    check_name(alias, field="alias", what="alias")
    if alias == "latest" or alias.isdigit() or (alias[:1] == "v" and alias[1:].isdigit()):
        # a naming rule, like check_name's: 422, not a conflict with stored state
        raise SpecError(f"alias {alias!r} would read as a version number", field="alias")
    version = resolve_version(session, model, ref)
    row = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == alias))
    if row is None:
        row = Alias(model_id=model.id, name=alias, version_id=version.id)
        session.add(row)
    else:
        row.version_id = version.id
        row.updated_at = utcnow()
    session.flush()
    return row


def delete_alias(session: Session, model: Model, alias: str) -> None:
    row = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == alias))
    if row is None:
        raise NotFoundError(f"model {model.name!r} has no alias {alias!r}", field="alias")
    session.delete(row)


def aliases_of(session: Session, model: Model) -> dict[str, int]:
    """``{alias: version number}`` for one model."""
    rows = session.execute(
        select(Alias.name, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == Alias.version_id)
        .where(Alias.model_id == model.id)
        .order_by(Alias.name)
    )
    return {name: version for name, version in rows}


def list_models(
    session: Session, project: Project, *, limit: int, offset: int
) -> tuple[list[Model], int]:
    where = Model.project_id == project.id
    total = session.scalar(select(func.count()).select_from(Model).where(where)) or 0
    rows = session.scalars(
        select(Model).where(where).order_by(Model.name).limit(limit).offset(offset)
    )
    return list(rows), total


def list_versions(
    session: Session, model: Model, *, limit: int, offset: int
) -> tuple[list[ModelVersion], int]:
    where = ModelVersion.model_id == model.id
    total = session.scalar(select(func.count()).select_from(ModelVersion).where(where)) or 0
    rows = session.scalars(
        select(ModelVersion)
        .where(where)
        .order_by(ModelVersion.version.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def latest_version(session: Session, model: Model) -> int | None:
    return session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    )

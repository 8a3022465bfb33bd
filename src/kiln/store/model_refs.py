"""What a server job's model paths may name, and how a worker turns them into folders.

Through the server a ``pretrained`` model (a train or crossval spec's ``model``, a
compress step's ``student``) names either a base model of the catalog, ``base:<name>``,
or a pretrained version of the project's own registry, ``model:<name>[@<version>]``,
to fine-tune further. Nothing else: a path, ``~``, ``file://``, ``pkg:`` or a hub id
gets one message, :data:`SERVER_PATH_RULE`, decided from the string alone, so the
answer says nothing about the server's files. A worker then rewrites each reference to
a local folder it made itself (:func:`pin_spec`) and writes the reference back into
what it stores (:meth:`Pins.restore`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import Session

from kiln.errors import NotFoundError, SpecError
from kiln.store.artifacts import ArtifactStore
from kiln.store.catalog import base_name, get_base_model, materialise
from kiln.store.db import Database
from kiln.store.registry import get_model, resolve_version
from kiln.store.tables import ModelVersion, Project

M = TypeVar("M", bound=BaseModel)

MODEL_PREFIX = "model:"
SERVER_PATH_RULE = (
    "on the server, a model path names a base model of the catalog, base:<name> "
    "(GET /api/v1/base-models lists them), or a pretrained version of this project, "
    "model:<name>[@<version>]"
)
"""The one answer to any other model path through the server, whatever it names: the
same words for a path that exists and one that does not, so nothing is learned."""


# model types whose spec names weights by path: they may only come from the catalog
PATHED_MODELS = ("pretrained", "causal_lm", "sentence_encoder")


def pinned_models(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field, model section) of every pretrained model a train/crossval/compress spec
    names: ``model`` and each distill step's ``student``."""
    out: list[tuple[str, dict[str, Any]]] = []
    model = spec.get("model")
    if isinstance(model, dict) and model.get("type") in PATHED_MODELS:
        out.append(("spec.model.path", model))
    for i, step in enumerate(spec.get("steps") or []):
        student = step.get("distill", {}).get("student") if isinstance(step, dict) else None
        if isinstance(student, dict) and student.get("type") in PATHED_MODELS:
            out.append((f"spec.steps.{i}.distill.student.path", student))
    return out


def _version_ref(path: str) -> tuple[str, str] | None:
    """``model:<name>[@<version>]`` -> (name, version or ``latest``); None otherwise."""
    if not path.startswith(MODEL_PREFIX):
        return None
    name, _, version = path[len(MODEL_PREFIX) :].partition("@")
    return name, version or "latest"


def _version(session: Session, project: Project, name: str, ref: str, field: str) -> ModelVersion:
    """The registered version, which must be a plain (not quantized) pretrained model."""
    try:
        version = resolve_version(session, get_model(session, project, name), ref)
    except NotFoundError as exc:
        raise SpecError(f"{field}: {exc.message}", field=field) from None
    summary = version.summary or {}
    quantized = (summary.get("runtime") or {}).get("quantization")
    if summary.get("model") != "pretrained" or quantized:
        kind = f"{quantized} " if quantized else ""
        raise SpecError(
            f"{field}: {name} v{version.version} is a {kind}{summary.get('model')} model; "
            "model:<name> continues from a pretrained encoder version (a causal_lm names a "
            "base model of the catalog: base:<name>)",
            field=field,
        )
    return version


def check_server_path(
    session: Session, project: Project, path: str, *, field: str, model_type: str | None = None
) -> None:
    """Refuse a model path a server job may not use, with a SpecError naming ``field``.

    Passes ``base:<name>`` of a Hugging Face directory in the catalog (or of a GGUF file
    when ``model_type`` is ``causal_lm``: GGUF holds a causal LM's weights and
    tokenizer), and ``model:<name>[@<version>]`` of a pretrained version of ``project``.
    Anything else gets :data:`SERVER_PATH_RULE`; nothing here touches the filesystem.
    """
    version = _version_ref(path)
    if version is not None:
        _version(session, project, *version, field)
        return
    name = base_name(path)
    if name is None:
        raise SpecError(f"{field}: {SERVER_PATH_RULE}", field=field)
    try:
        info = get_base_model(session, name)
    except NotFoundError:
        raise SpecError(
            f"{field}: no base model {name[:80]!r} in the catalog "
            "(GET /api/v1/base-models lists them)",
            field=field,
        ) from None
    if info.kind != "hf_dir" and not (info.kind == "gguf" and model_type == "causal_lm"):
        raise SpecError(
            f"{field}: base:{name} is a {info.kind} file; a {model_type or 'pretrained'} "
            "model needs a Hugging Face model directory",
            field=field,
        )


class Pins:
    """The local folders a job's spec was rewritten to, and the refs they stand for."""

    def __init__(self) -> None:
        self.refs: dict[str, str] = {}  # local path -> "base:<name>" | "model:<name>@<n>"

    def restore_model(self, obj: M) -> M:
        """A copy of the pydantic model ``obj`` with every pinned local path back to its
        reference (a manifest's model spec, lineage)."""
        return type(obj).model_validate(self.restore(obj.model_dump(mode="json")))

    def restore(self, obj: Any) -> Any:
        """``obj`` (JSON-like, changed in place where mutable) with every pinned local path
        back to its reference: what a bundle's lineage and meta keep."""
        if isinstance(obj, dict):
            for k, v in obj.items():
                obj[k] = self.restore(v)
            return obj
        if isinstance(obj, list):
            obj[:] = [self.restore(v) for v in obj]
            return obj
        if isinstance(obj, str):
            return self.refs.get(obj, obj)
        return obj


def pin_spec(
    db: Database,
    store: ArtifactStore,
    spec: dict[str, Any],
    tmp: Path,
    *,
    project_id: int | None = None,
) -> Pins:
    """Rewrite every model path of ``spec`` (in place) to a local folder under ``tmp``:
    ``base:<name>`` to a copy checked against its pinned SHA-256s, ``model:<name>@<v>``
    (of project ``project_id``) to a Hugging Face folder exported from that bundle.

    Any other path is refused as at submission: a job queued before that check existed,
    or written into the database by hand, reads nothing it names.
    """
    pins = Pins()
    local: dict[str, str] = {}
    for field, model in pinned_models(spec):
        path = str(model.get("path", ""))
        if path not in local:
            local[path], pins.refs[local[path]] = _pin(db, store, path, tmp, project_id, field)
        model["path"] = local[path]
    return pins


def _pin(
    db: Database, store: ArtifactStore, path: str, tmp: Path, project_id: int | None, field: str
) -> tuple[str, str]:
    """(local folder, the reference it stands for) of one model path."""
    version = _version_ref(path)
    if version is not None and project_id is not None:
        return _export_version(db, store, project_id, *version, tmp, field)
    name = base_name(path)
    if name is None:
        raise SpecError(f"{field}: {SERVER_PATH_RULE}", field=field)
    return str(materialise(db, store, name, tmp / "base-models" / name)), path


def _export_version(
    db: Database,
    store: ArtifactStore,
    project_id: int,
    name: str,
    ref: str,
    tmp: Path,
    field: str,
) -> tuple[str, str]:
    """A registered pretrained version as a Hugging Face folder (config, safetensors
    weights with its head, tokenizer): the bundle's own files, never a path."""
    from kiln.bundle import Bundle

    with db.session() as s:
        project = s.get(Project, project_id)
        if project is None:
            raise SpecError(f"{field}: the job's project is gone", field=field)
        version = _version(s, project, name, ref, field)
        key, number = version.artifact_key, version.version
    dest = tmp / "versions" / f"{name}-{number}"  # a registered name: path-safe
    store.get_dir(key, dest / "bundle")
    bundle = Bundle.load(dest / "bundle")
    hf: Any = bundle.model
    tokenizer = bundle.preprocessor.tokenizer
    if not hasattr(hf, "hf") or tokenizer is None:
        raise SpecError(f"{field}: {name} v{number} is no pretrained text model", field=field)
    hf.hf.save_pretrained(str(dest / "hf"))
    tokenizer.save_pretrained(str(dest / "hf"))
    return str(dest / "hf"), f"{MODEL_PREFIX}{name}@{number}"

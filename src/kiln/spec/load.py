"""Turn YAML/JSON text, a file or a dict into a validated :class:`Spec`.

Validation errors become one :class:`~kiln.errors.SpecError` whose message names
every offending key by its dotted path (``train.optimizer.lr``) and suggests the
closest valid key for typos.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, JsonValue, ValidationError
from pydantic_core import ErrorDetails

from kiln.errors import NotFoundError, SpecError
from kiln.spec.spec import Spec

M = TypeVar("M", bound=BaseModel)
Document = dict[str, JsonValue]
"""A spec document as parsed from YAML/JSON, not yet validated."""


def load_spec(source: str | Path | Document | Spec) -> Spec:
    """Validate a spec given as a path to YAML/JSON, a mapping, or a Spec (returned as is)."""
    return load_document(Spec, source)


def load_document(model: type[M], source: str | Path | Document | M) -> M:
    """Validate any spec document (``model``) from a YAML/JSON file, a mapping or itself."""
    if isinstance(source, model):
        return source
    if isinstance(source, dict):
        return validate(model, source)
    path = Path(source)  # type: ignore[arg-type]
    if not path.is_file():
        raise NotFoundError(f"spec file not found: {path}", field="spec")
    return validate(model, parse_document(path.read_text(encoding="utf-8"), str(path)))


def parse_document(text: str, origin: str = "spec") -> Document:
    """Parse YAML (a superset of JSON) into a mapping; errors carry the line number."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{origin} is not valid YAML/JSON{where}: {exc}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{origin} must be a mapping of keys to values, not {type(doc).__name__}")
    document: Document = doc
    return document


def validate(model: type[M], data: Document) -> M:
    """Validate ``data`` against ``model``, turning pydantic errors into a SpecError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(model, err) for err in exc.errors()]
        first_field = problems[0][0] if problems else None
        lines = [f"{field}: {msg}" if field else msg for field, msg in problems]
        raise SpecError("invalid spec:\n  " + "\n  ".join(lines), field=first_field) from None


def _describe(model: type[BaseModel], err: ErrorDetails) -> tuple[str | None, str]:
    raw = err["loc"]
    if err["type"] == "extra_forbidden" and raw:
        # the unknown key itself is what the user wrote, even if named like a union tag
        loc = [*_clean_loc(raw[:-1]), raw[-1]]
    else:
        loc = _clean_loc(raw)
    field = ".".join(str(p) for p in loc) or None
    if err["type"] == "extra_forbidden":
        hint = _suggest(model, loc)
        return field, "unknown key" + (f" (did you mean {hint!r}?)" if hint else "")
    if err["type"] == "missing":
        return field, "required key is missing"
    if err["type"] == "invalid_step":
        given = list(err["input"]) if isinstance(err["input"], dict) else []
        kinds = ["distill", "prune", "quantize"]
        hint = next((h for h in (closest(str(k), kinds) for k in given) if h), None)
        return field, (
            f"unknown step {', '.join(map(repr, given)) or repr(err['input'])}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + "; each step is one key: distill, prune or quantize"
        )
    msg = str(err["msg"]).removeprefix("Value error, ")
    # Cross-section checks name their key first: "train.loss: ...".
    named = _NAMED.match(msg)
    if named and (field is None or named.group(1).startswith(field)):
        return named.group(1), named.group(2)
    return field, msg


_NAMED = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+): (.*)$", re.DOTALL)
_STEP_TAGS = frozenset({"distill", "prune", "quantize"})
_MODEL_TAGS = frozenset({"linear", "mlp", "cnn", "transformer", "pretrained"})
# Member names pydantic puts in an error path for `int | str | ...` unions.
_UNION_TAGS = frozenset({"int", "str", "float", "bool", "none", "list", "tuple", "dict"})


def _clean_loc(loc: tuple[int | str, ...]) -> list[int | str]:
    # Tagged unions put the tag ('mlp') in the path; users never wrote it.
    out: list[int | str] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in _MODEL_TAGS and out == ["model"]:
            continue
        if (
            isinstance(part, str)
            and part in _STEP_TAGS
            and out
            and isinstance(out[-1], int)
            and i + 1 < len(loc)
            and loc[i + 1] == part
        ):
            continue  # steps.0.prune.prune.amount: the first "prune" is the union's tag
        if isinstance(part, str) and (
            part in _UNION_TAGS or part.startswith(("function-", "literal["))
        ):
            continue
        out.append(part)
    return out


def _suggest(model: type[BaseModel], loc: list[int | str]) -> str | None:
    """The closest valid key at ``loc`` to the unknown key at its end."""
    *parents, bad = loc
    candidates: list[type[BaseModel]] = [model]
    for part in parents:
        if isinstance(part, int):
            continue  # a list index: the item's model is the list's
        nxt: list[type[BaseModel]] = []
        for cls in candidates:
            field = cls.model_fields.get(str(part))
            if field is not None:
                nxt += _models_in(field.annotation)
        candidates = nxt
    names = sorted({name for cls in candidates for name in cls.model_fields})
    return closest(str(bad), names)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``word`` (a likely typo of it), or None if none is close:
    the "did you mean" of every unknown key, step or column name."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every BaseModel class inside an annotation (unions give all their members)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _models_in(arg)
    return found


def dump_spec(spec: Spec) -> str:
    """Canonical JSON of a spec (defaults filled in), as stored in bundle lineage."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)

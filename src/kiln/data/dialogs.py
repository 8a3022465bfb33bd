"""Read and validate generation data: chat, prompt/completion and plain-text corpora.

Formats (``data.format``; inferred from the first record when left out):

- ``chat``: OpenAI chat fine-tuning JSON lines, ``{"messages": [{"role", "content"}, ...]}``.
  Roles are system, user and assistant; a message may carry a ``name`` (accepted and
  not rendered), any other key is refused. Every chat needs an assistant turn, and no
  assistant turn may be empty.
- ``completion``: JSON lines (or a csv/parquet table) of ``{"prompt": str, "completion": str}``;
  the prompt may be empty, the completion may not.
- ``text``: a csv/tsv/parquet table or JSON lines with a text column (``text_column``,
  default ``"text"``).

Other top-level keys of a record are ignored. Blank lines are skipped. Every error is
a DataError (field ``data.source``) that names the file and the 1-based line (JSONL)
or data row (tables: row 1 is the first row under the header). csv cells are read as
the strings in the file. Ingestion is bounded: a line over 1 MiB, a file over 512 MiB
or more than 1,000,000 examples is refused with a message that says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Literal, cast, get_args

import pandas as pd
from pydantic import BaseModel, ConfigDict

from kiln.data.sources import read_table, table_format
from kiln.errors import DataError, NotFoundError

Role = Literal["system", "user", "assistant"]
LMFormat = Literal["chat", "completion", "text"]

ROLES: tuple[str, ...] = get_args(Role)
MAX_LINE_BYTES = 1 << 20  # 1 MiB: one JSON line
MAX_FILE_BYTES = 512 << 20  # 512 MiB: one data file as stored
MAX_EXAMPLES = 1_000_000
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_TABLE_FORMATS = ("csv", "tsv", "parquet")
_FIELD = "data.source"


class Message(BaseModel):
    """One turn of a chat."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """One training example; exactly one of messages / (prompt, completion) / text is set."""

    line: int  # 1-based line of a JSONL file, or 1-based row of a table
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def content(self) -> dict[str, object]:
        """The example's content without its line: what the fingerprint hashes."""
        if self.messages is not None:
            return {"messages": [m.model_dump() for m in self.messages]}
        if self.text is not None:
            return {"text": self.text}
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class Corpus:
    """The validated examples of one source, in file order."""

    format: LMFormat
    examples: list[Example]
    fingerprint: str  # "sha256:<hex>" of the canonical content (not the path, not line numbers)
    source: str


def read_corpus(source: str, fmt: LMFormat | None = None, text_column: str | None = None) -> Corpus:
    """Read and validate ``source`` (a path or fsspec URI).

    csv/tsv/parquet files are read as tables (format text or completion); anything else
    is read as JSON lines. ``fmt`` None infers the format from the first record.
    """
    column = text_column or "text"
    _check_size(source)
    try:
        kind = table_format(source)
    except DataError:
        kind = "jsonl"
    records = _table_records(source, kind) if kind in _TABLE_FORMATS else _jsonl_records(source)
    examples: list[Example] = []
    for line, record in records:
        if fmt is None:
            fmt = infer_format(_as_object(record, line, source))
        if fmt == "chat" and kind in _TABLE_FORMATS:
            raise DataError(
                f"{source}: chat data must be JSON lines, not a {kind} table", field=_FIELD
            )
        if len(examples) >= MAX_EXAMPLES:
            raise DataError(
                f"{source} holds more than {MAX_EXAMPLES:,} examples; split it or sample it",
                field=_FIELD,
            )
        try:
            examples.append(parse_example(record, line, fmt, text_column=column))
        except DataError as exc:
            message = exc.message
            if kind in _TABLE_FORMATS:  # a table's data row (1 = the first under the header)
                message = message.replace(f"line {line}", f"row {line}", 1)
            raise DataError(f"{source}, {message}", field=_FIELD) from None
    if fmt is None or not examples:
        raise DataError(f"{source} holds no examples (the file is empty)", field=_FIELD)
    return Corpus(
        format=fmt, examples=examples, fingerprint=corpus_fingerprint(fmt, examples), source=source
    )


def infer_format(record: Mapping[str, object]) -> LMFormat:
    """``messages`` -> chat; ``prompt`` and ``completion`` -> completion; else text."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completion"
    return "text"


def parse_example(
    record: object, line: int, fmt: LMFormat, *, text_column: str = "text"
) -> Example:
    """One record (a decoded JSON value or a table row) as an Example of format ``fmt``.

    Errors are DataErrors whose message starts with ``line N:``.
    """
    obj = _as_object(record, line)
    if fmt == "chat":
        messages = _require(obj, "messages", line, fmt)
        return Example(line=line, messages=_parse_messages(messages, line))
    if fmt == "completion":
        prompt = _string(_require(obj, "prompt", line, fmt), f"line {line}: 'prompt'")
        completion = _string(_require(obj, "completion", line, fmt), f"line {line}: 'completion'")
        if not completion.strip():
            raise DataError(f"line {line}: the completion is empty", field=_FIELD)
        return Example(line=line, prompt=prompt, completion=completion)
    text = _string(_require(obj, text_column, line, fmt), f"line {line}: {text_column!r}")
    if not text.strip():
        raise DataError(f"line {line}: the text in {text_column!r} is empty", field=_FIELD)
    return Example(line=line, text=text)


def corpus_fingerprint(fmt: LMFormat, examples: list[Example]) -> str:
    """sha256 over the format and each example's canonical JSON (sorted keys, one per line)."""
    digest = hashlib.sha256(f"kiln-lm-corpus:{fmt}\n".encode())
    for example in examples:
        canonical = json.dumps(
            example.content(), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        digest.update(canonical.encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def _parse_messages(value: object, line: int) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise DataError(
            f"line {line}: 'messages' must be a list, not {type(value).__name__}", field=_FIELD
        )
    if not value:
        raise DataError(f"line {line}: 'messages' is empty", field=_FIELD)
    messages = tuple(_parse_message(m, line, i) for i, m in enumerate(value, start=1))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(
            f"line {line}: the chat has no assistant turn (nothing to train on)", field=_FIELD
        )
    return messages


def _parse_message(value: object, line: int, index: int) -> Message:
    where = f"line {line}, message {index}"
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: expected an object with role and content, not {type(value).__name__}",
            field=_FIELD,
        )
    extra = sorted(str(k) for k in value if k not in _MESSAGE_KEYS)
    if extra:
        raise DataError(
            f"{where}: unsupported key(s) {extra}; a message has role, content and optionally name",
            field=_FIELD,
        )
    for key in ("role", "content"):
        if key not in value:
            raise DataError(f"{where}: missing key {key!r}", field=_FIELD)
    role = value["role"]
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; one of {list(ROLES)}", field=_FIELD)
    content = _string(value["content"], f"{where}: 'content'")
    if "name" in value:
        _string(value["name"], f"{where}: 'name'")
    if role == "assistant" and not content.strip():
        raise DataError(f"{where}: the assistant turn is empty", field=_FIELD)
    return Message(role=cast(Role, role), content=content)


def _as_object(record: object, line: int, source: str | None = None) -> dict[str, object]:
    if not isinstance(record, dict):
        where = f"{source}, line {line}" if source else f"line {line}"
        raise DataError(
            f"{where}: expected a JSON object, not {type(record).__name__}", field=_FIELD
        )
    return cast(dict[str, object], record)


def _require(obj: Mapping[str, object], key: str, line: int, fmt: LMFormat) -> object:
    if key not in obj:
        raise DataError(
            f"line {line}: missing key {key!r} (format {fmt}; keys here: {sorted(obj)})",
            field=_FIELD,
        )
    return obj[key]


def _string(value: object, where: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where} is missing (null)", field=_FIELD)
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, not {type(value).__name__}", field=_FIELD)
    return value


def _check_size(source: str) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
        size = fs.size(path)
    except FileNotFoundError:
        raise NotFoundError(f"data file not found: {source}", field=_FIELD) from None
    except (OSError, ValueError):
        return  # a filesystem that cannot tell sizes: the line and example caps still bound it
    if isinstance(size, int) and size > MAX_FILE_BYTES:
        raise DataError(
            f"{source} is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES >> 20} MiB limit "
            "for one data file; split it",
            field=_FIELD,
        )


def _table_records(source: str, kind: str) -> Iterator[tuple[int, object]]:
    """(1-based row, row as a dict) of a table; csv cells stay strings, as written."""
    frame = read_table(source, kind) if kind == "parquet" else _read_csv_text(source, kind)
    yield from enumerate(frame.to_dict(orient="records"), start=1)


def _read_csv_text(source: str, kind: str) -> pd.DataFrame:
    # Every cell as the string in the file: " 2" stays " 2" (not the int 2), and an
    # empty cell is "" (reported as empty text), never NaN.
    import fsspec

    try:
        with fsspec.open(source, mode="rb", compression="infer") as fh:
            frame = pd.read_csv(
                fh, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False
            )
    except FileNotFoundError:
        raise NotFoundError(f"data file not found: {source}", field=_FIELD) from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DataError(f"cannot read {source} as {kind}: {reason}", field=_FIELD) from None
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _jsonl_records(source: str) -> Iterator[tuple[int, object]]:
    """(1-based line, decoded JSON value) per non-blank line of a JSON-lines file."""
    import fsspec

    try:
        with fsspec.open(source, mode="rb", compression="infer") as fh:
            yield from _decode_lines(cast(IO[bytes], fh), source)
    except FileNotFoundError:
        raise NotFoundError(f"data file not found: {source}", field=_FIELD) from None
    except IsADirectoryError:
        raise DataError(f"{source} is a directory, not a data file", field=_FIELD) from None


def _decode_lines(fh: IO[bytes], source: str) -> Iterator[tuple[int, object]]:
    total = 0
    line = 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        line += 1
        total += len(raw)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(
                f"{source}, line {line}: longer than {MAX_LINE_BYTES >> 20} MiB", field=_FIELD
            )
        if total > MAX_FILE_BYTES:
            raise DataError(
                f"{source}: over {MAX_FILE_BYTES >> 20} MiB of data; split it", field=_FIELD
            )
        try:
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{source}, line {line}: not valid UTF-8", field=_FIELD) from None
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source}, line {line}: invalid JSON ({exc.msg} at column {exc.colno})",
                field=_FIELD,
            ) from None

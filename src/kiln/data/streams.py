"""Bounded byte streams for reading untrusted tables: decompressed, metered, line-bounded.

:class:`Metered` passes a table's (decompressed) bytes through to a parser while it
counts them against a cap, checks they are UTF-8, bounds every line and, for a chunked
parser, the bytes one chunk may read. :func:`json_lines` and :func:`array_records` cut
JSON into records of bounded size. Used by :mod:`kiln.data.scan`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import DataError, TooLargeError

MAX_LINE_BYTES = 32 << 20  # one physical line (or JSON record); a row is read whole
READ_SIZE = 1 << 20


class OverBudget(Exception):  # noqa: N818 - a chunk of this many rows read too many bytes
    def __init__(self, rows: int) -> None:
        self.rows = rows


class Metered(io.RawIOBase):
    """The table's bytes (decompressed) as they are read: counted against the limit,
    checked as UTF-8, and no line longer than :data:`MAX_LINE_BYTES`."""

    def __init__(
        self, raw: io.BufferedIOBase, filename: str, max_bytes: int, *, line_limit: bool = True
    ) -> None:
        self.raw = raw
        self.filename = filename
        self.max_bytes = max_bytes
        self.seen = 0
        self.line = 0  # bytes since the last line break
        self.line_limit = line_limit
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.budget: tuple[int, int] | None = None  # (rows, bytes) a chunk may read
        self.chunk_start = 0  # self.seen when the chunk began

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(min(len(buffer), READ_SIZE))
        if not data:
            return 0
        if self.seen + len(data) > self.max_bytes:
            raise too_many_bytes(self.filename, self.max_bytes)
        if self.budget is not None and self.seen - self.chunk_start > self.budget[1]:
            raise OverBudget(self.budget[0])
        try:
            self.decoder.decode(data)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.filename} is not UTF-8 text (byte {self.seen + exc.start}): "
                "save it as UTF-8 and upload again",
                field="file",
            ) from None
        if self.line_limit:
            self._lines(data)
        self.seen += len(data)
        buffer[: len(data)] = data
        return len(data)

    def _lines(self, data: bytes) -> None:
        last = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last < 0:
            self.line += len(data)
        else:
            first = min(i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0)
            longest = self.line + first
            if len(data) > MAX_LINE_BYTES:  # only then can a line inside it be too long
                longest = max(longest, *(len(s) for s in data.splitlines()))
            self.line = len(data) - last - 1
            self.line_check(longest)
        self.line_check(self.line)

    def line_check(self, length: int) -> None:
        if length > MAX_LINE_BYTES:
            raise TooLargeError(
                f"{self.filename} has a line longer than {MAX_LINE_BYTES >> 20} MiB; "
                "kiln reads a table a row at a time",
                field="file",
            )

    def finish(self) -> None:
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{self.filename} ends inside a UTF-8 character", field="file"
            ) from None


def open_decompressed(path: Path, filename: str) -> io.BufferedIOBase:
    """The file's bytes, decompressed as its suffix says (.gz, .bz2, .xz)."""
    suffix = filename.lower().rsplit(".", 1)[-1]
    if suffix == "gz":
        return gzip.GzipFile(path, "rb")
    if suffix == "bz2":
        return bz2.BZ2File(path, "rb")
    if suffix == "xz":
        return lzma.LZMAFile(path, "rb")
    if suffix == "zst":
        raise DataError(
            f"{filename}: zstd-compressed tables are not supported; use .gz, .bz2 or .xz",
            field="file",
        )
    return path.open("rb")


def too_many_bytes(filename: str, max_bytes: int) -> TooLargeError:
    """Past the decompressed-bytes cap (``KILN_MAX_DECOMPRESSED_MB``)."""
    return TooLargeError(
        f"{filename} holds more than {max_bytes / (1 << 20):,.0f} MiB once "
        "decompressed, the limit (KILN_MAX_DECOMPRESSED_MB)",
        field="file",
    )


def first_row(head: bytes) -> bytes:
    """The header line of a CSV (quoted line breaks aside: only its width matters)."""
    end = min((i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0), default=len(head))
    return head[:end] + b"\n"


def json_lines(fh: io.BufferedIOBase) -> Iterator[bytes]:
    """JSON lines, blank ones skipped (as pandas does)."""
    for line in iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""):
        if line.strip():
            yield line.rstrip(b"\r\n") + b"\n"


def array_records(fh: io.BufferedIOBase, filename: str) -> Iterator[bytes]:
    """The elements of a top-level JSON array, one JSON line each, read incrementally
    (a 200 MB array parsed whole takes gigabytes of Python objects)."""
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    pos = 0
    eof = False
    started = False

    def more() -> bool:
        nonlocal buf, pos, eof
        data = fh.read(READ_SIZE)
        eof = not data
        buf = buf[pos:] + text_decoder.decode(data, final=eof)
        pos = 0
        return not eof

    def too_long() -> TooLargeError:
        return TooLargeError(
            f"{filename} has a JSON record longer than {MAX_LINE_BYTES >> 20} MiB",
            field="file",
        )

    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(buf):
            if not more():
                raise ValueError("the JSON array is not closed")
            continue
        if not started:
            if buf[pos] != "[":
                raise ValueError("expected a JSON array")
            started, pos = True, pos + 1
            continue
        if buf[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if len(buf) - pos > MAX_LINE_BYTES:
                raise too_long() from None
            if not more():
                raise
            continue
        if end == len(buf) and not eof:  # a number may go on in the next read
            more()
            continue
        if end - pos > MAX_LINE_BYTES:
            raise too_long()
        pos = end
        yield json.dumps(value).encode() + b"\n"

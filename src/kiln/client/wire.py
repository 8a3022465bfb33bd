"""What crosses the wire between the SDK and the server: JSON shapes and the mapping
of an error response back to its kiln error class (a deployment's ``overloaded`` 503
and ``timeout`` 504 are ``QueueFull`` and ``DeadlineExceeded``, both ``ServiceError``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from kiln.errors import ERRORS_BY_CODE, KilnError, ServiceError

JSON = dict[str, Any]
"""Any JSON object (public since 0.x; the server's answers have shapes of their own,
:mod:`kiln.client.shapes`, which the resource groups return)."""
Items = list[JSON]
API = "/api/v1"
DEPLOY_TIMEOUT = 600.0
"""Seconds to wait for a deployment to load and warm up (create, swap, canary)."""


def error_of(response: httpx.Response, url: str) -> KilnError:
    """The KilnError a non-2xx response stands for (``ServiceError`` if not kiln's JSON)."""
    try:
        body = response.json()
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return ServiceError(
            f"kiln server at {url} answered {response.status_code} "
            f"{response.reason_phrase} to {response.request.method} {response.request.url.path}"
        )
    cls = ERRORS_BY_CODE.get(code, KilnError)
    exc = cls(message, field=error.get("field"))
    if exc.retry_after is not None:  # a spent rate limit (429), a full queue (503)
        retry = response.headers.get("Retry-After", "")
        exc.retry_after = int(retry) if retry.isdigit() else 1
    if cls is KilnError:
        exc.code = code  # keep the server's code (e.g. "invalid_request") for to_dict()
    return exc


def records(rows: Any) -> list[dict[str, object]]:
    """Rows as a list of plain dicts: a DataFrame's records (NaN as None), or the list given."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        frame = rows.astype(object).where(rows.notna(), None)
        out: list[dict[str, object]] = frame.to_dict(orient="records")
        return out
    if isinstance(rows, Mapping):
        raise TypeError("rows: a list of {column: value} rows or a DataFrame, not one row")
    return list(rows)

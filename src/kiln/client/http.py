"""The connection: one server, one API key, errors raised as kiln's classes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import Any

import httpx

from kiln.client.groups import (
    BaseModels,
    Datasets,
    Deployments,
    Jobs,
    Keys,
    Models,
    Projects,
    Quotas,
)
from kiln.client.shapes import Health, UsageOut
from kiln.client.wire import API, error_of
from kiln.errors import ServiceError


class Client:
    """A connection to one kiln server, as one API key.

    ``url``, ``api_key`` and ``project`` default to the settings (``KILN_URL``,
    ``KILN_API_KEY``, ``KILN_PROJECT``). ``project`` is the project a global admin key
    acts on (sent as ``?project=`` on datasets, jobs and models); a project key always
    acts on its own project. ``transport`` replaces httpx's (tests, proxies); by
    default connection failures are retried 3 times. Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        project: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if url is None or api_key is None or project is None:
            from kiln.settings import Settings

            settings = Settings()
            url = url if url is not None else settings.url
            api_key = api_key if api_key is not None else settings.api_key
            project = project if project is not None else settings.project
        self.url = url.rstrip("/")
        self.project = project
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport or httpx.HTTPTransport(retries=3),
        )
        self.projects = Projects(self)
        self.keys = Keys(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.deployments = Deployments(self)
        self.quotas = Quotas(self)
        self.base_models = BaseModels(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> Health:
        """``GET /healthz`` (needs no key): ``{"status": "ok", "version": ...}``."""
        result: Health = self._send("GET", "/healthz").json()
        return result

    def usage(
        self,
        from_: str | date | datetime | None = None,
        to: str | date | datetime | None = None,
        group_by: str = "day",
        by: Sequence[str] = (),
    ) -> UsageOut:
        """The project's metered usage: ``{project, from, to, group_by, by, items:
        [{period, kind, device, quantity, deployment, key}], totals: {kind: quantity},
        quotas: [{kind, period, limit, used}]}``.

        ``from_`` and ``to`` (exclusive) are dates or datetimes (naive means UTC) or ISO
        strings; ``group_by`` is ``day``, ``month`` or ``total``; ``by`` splits the items
        by ``deployment`` and/or ``key`` (else those are None).
        """
        params: dict[str, str] = {"group_by": group_by}
        if by:
            params["by"] = ",".join(by)
        if from_ is not None:
            params["from"] = from_.isoformat() if isinstance(from_, date) else from_
        if to is not None:
            params["to"] = to.isoformat() if isinstance(to, date) else to
        result: UsageOut = self._json("GET", "/usage", scoped=True, params=params)
        return result

    # --- plumbing -------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, scoped: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One request; a non-2xx answer raises the matching KilnError."""
        if scoped and self.project:
            kwargs["params"] = {**(kwargs.get("params") or {}), "project": self.project}
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceError(
                f"kiln server at {self.url} did not answer in time ({exc})"
            ) from None
        except httpx.TransportError as exc:
            raise ServiceError(f"cannot reach the kiln server at {self.url}: {exc}") from None
        if response.is_success:
            return response
        raise error_of(response, self.url)

    def _json(self, method: str, path: str, *, scoped: bool = False, **kwargs: Any) -> Any:
        response = self._send(method, API + path, scoped=scoped, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ServiceError(
                f"kiln server at {self.url} answered {method} {path} with something not JSON"
            ) from None

    def _pages(
        self, path: str, page_size: int, params: Mapping[str, str] | None = None
    ) -> Iterator[Any]:
        """Every item of a paginated list, following ``next_offset`` (as the server sent
        them, like :meth:`_json`: the caller names their shape)."""
        offset: int | None = 0
        while offset is not None:
            query = {**(params or {}), "limit": page_size, "offset": offset}
            page = self._json("GET", path, scoped=True, params=query)
            yield from page["items"]
            offset = page["next_offset"]

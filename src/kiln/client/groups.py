"""The SDK's resource groups (``client.jobs``, ``client.models``, ...): one class per
family of REST routes, each a thin typed call through its :class:`~kiln.client.Client`."""

from __future__ import annotations

import builtins  # ``list`` is a method of the groups
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from kiln.archive import extract_bundle
from kiln.client.shapes import (
    BaseModelOut,
    DatasetOut,
    DeploymentOut,
    JobLogOut,
    JobMetrics,
    JobOut,
    KeyOut,
    ModelOut,
    NewKeyOut,
    Page,
    PredictOut,
    ProjectOut,
    QuotaOut,
    VersionOut,
)
from kiln.client.wire import API, DEPLOY_TIMEOUT, error_of, records
from kiln.errors import ConflictError, NotFoundError, ServiceError
from kiln.lifecycle import FINAL_STATES, JobKind

if TYPE_CHECKING:
    from kiln.client.http import Client


class _Group:
    def __init__(self, client: Client) -> None:
        self._c = client


class Projects(_Group):
    """Projects (a global admin key)."""

    def create(self, name: str) -> ProjectOut:
        result: ProjectOut = self._c._json("POST", "/projects", json={"name": name})
        return result

    def list(self) -> list[ProjectOut]:
        result: list[ProjectOut] = self._c._json("GET", "/projects")
        return result


class Keys(_Group):
    """API keys (an admin key)."""

    def create(
        self, scopes: Sequence[str], *, project: str | None = None, name: str = ""
    ) -> NewKeyOut:
        """Issue a key; ``result["key"]`` is the secret, returned this once only.

        A global admin key with no ``project`` issues another global key.
        """
        body = {"scopes": list(scopes), "name": name, "project": project}
        result: NewKeyOut = self._c._json("POST", "/keys", json=body)
        return result

    def list(self) -> list[KeyOut]:
        result: list[KeyOut] = self._c._json("GET", "/keys")
        return result

    def revoke(self, key_id: str, *, confirm_self: bool = False) -> KeyOut:
        """Revoke a key. The key this client uses needs ``confirm_self=True``, and the
        last active global admin key cannot be revoked (``ConflictError`` for both)."""
        params = {"confirm_self": "true"} if confirm_self else None
        result: KeyOut = self._c._json("DELETE", f"/keys/{key_id}", params=params)
        return result


class BaseModels(_Group):
    """The base-model catalog: specs on the server name an entry as ``base:<name>``.

    Any key with ``read`` lists it; adding and removing take a global admin key.
    """

    def add(self, name: str, source: str, *, timeout: float | None = 3600.0) -> BaseModelOut:
        """Register ``source`` (read by the server: a model directory, a GGUF file,
        ``pkg:<package>/<dir>``, or a hub id where the server sets KILN_ALLOW_HUB=1);
        its files are copied and pinned by SHA-256. Copying takes a while for large
        models, hence the long default ``timeout`` (seconds)."""
        result: BaseModelOut = self._c._json(
            "POST", "/base-models", json={"name": name, "source": source}, timeout=timeout
        )
        return result

    def list(self) -> list[BaseModelOut]:
        result: list[BaseModelOut] = self._c._json("GET", "/base-models")
        return result

    def get(self, name: str) -> BaseModelOut:
        result: BaseModelOut = self._c._json("GET", f"/base-models/{_seg(name)}")
        return result

    def remove(self, name: str) -> BaseModelOut:
        result: BaseModelOut = self._c._json("DELETE", f"/base-models/{_seg(name)}")
        return result


def _seg(value: str) -> str:
    """``value`` as one URL path segment (a ``/`` or ``..`` in it cannot change the route)."""
    return quote(value, safe="").replace(".", "%2E")  # quote keeps "." and ".."


class Datasets(_Group):
    """Tables stored on the server; specs use them as ``data.source: dataset:<id>``."""

    def upload(self, path: str | Path, *, name: str | None = None) -> DatasetOut:
        """Upload a local .csv/.tsv/.jsonl/.parquet file, or a .zip/.tar.gz of an image
        folder or of a table and its images; the dataset (``ref``, rows, ...)."""
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"file not found: {path}", field="file")
        data = {"name": name} if name is not None else None
        with path.open("rb") as fh:
            result: DatasetOut = self._c._json(
                "POST", "/datasets", scoped=True, files={"file": (path.name, fh)}, data=data
            )
        return result

    def import_uri(self, uri: str, *, name: str) -> DatasetOut:
        """Register a table the server reads itself (s3://..., or a path under its data roots)."""
        result: DatasetOut = self._c._json(
            "POST", "/datasets/import", scoped=True, json={"uri": uri, "name": name}
        )
        return result

    def list(self, limit: int = 50, offset: int = 0) -> Page[DatasetOut]:
        """One page: ``{items, total, limit, offset, next_offset}``."""
        result: Page[DatasetOut] = self._c._json(
            "GET", "/datasets", scoped=True, params={"limit": limit, "offset": offset}
        )
        return result

    def all(self, *, page_size: int = 100) -> Iterator[DatasetOut]:
        """Every dataset, fetched a page at a time."""
        return self._c._pages("/datasets", page_size)

    def get(self, dataset_id: str) -> DatasetOut:
        result: DatasetOut = self._c._json("GET", f"/datasets/{dataset_id}", scoped=True)
        return result


class Jobs(_Group):
    """Training, cross-validation and evaluation jobs, run by the server's workers."""

    def submit(
        self,
        spec: Mapping[str, object] | str | Path,
        *,
        kind: JobKind | str = JobKind.train,
        data: str | Path | None = None,
        folds: int | None = None,
        max_attempts: int | None = None,
    ) -> JobOut:
        """Queue a job of ``kind`` (a :class:`~kiln.lifecycle.JobKind` or its value);
        returns it (state ``queued``).

        ``spec`` is a mapping or a YAML/JSON file. With ``data`` (a local table) the
        file is uploaded first and the spec's data source set to it. The server checks
        the spec now: a mistake raises ``SpecError`` naming the field (``spec.model.hiden``).
        """
        doc: dict[str, object]
        if isinstance(spec, Mapping):
            doc = dict(spec)
        else:
            from kiln.spec.load import parse_document

            path = Path(spec)
            if not path.is_file():
                raise NotFoundError(f"spec file not found: {path}", field="spec")
            doc = dict(parse_document(path.read_text(encoding="utf-8"), str(path)))
        if data is not None:
            ref = self._c.datasets.upload(data)["ref"]
            if kind in (JobKind.evaluate, JobKind.compress):  # their data: a table ref
                doc["data"] = ref
            else:
                section = doc.get("data")
                doc["data"] = {**(section if isinstance(section, dict) else {}), "source": ref}
        body: dict[str, object] = {"kind": str(kind), "spec": doc}
        if folds is not None:
            body["folds"] = folds
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        result: JobOut = self._c._json("POST", "/jobs", scoped=True, json=body)
        return result

    def get(self, job_id: str) -> JobOut:
        result: JobOut = self._c._json("GET", f"/jobs/{job_id}", scoped=True)
        return result

    def list(self, state: str | None = None, *, limit: int = 50, offset: int = 0) -> Page[JobOut]:
        """One page of jobs, newest first; ``state`` filters (queued, running, ...)."""
        params: dict[str, str | int] = {"limit": limit, "offset": offset}
        if state is not None:
            params["state"] = state
        result: Page[JobOut] = self._c._json("GET", "/jobs", scoped=True, params=params)
        return result

    def all(self, state: str | None = None, *, page_size: int = 100) -> Iterator[JobOut]:
        """Every job (in ``state``), newest first, fetched a page at a time."""
        return self._c._pages("/jobs", page_size, {"state": state} if state else None)

    def metrics(self, job_id: str) -> JobMetrics:
        """``{job_id, epochs: [{epoch, train_loss, val_*, lr, seconds, ...}]}``."""
        result: JobMetrics = self._c._json("GET", f"/jobs/{job_id}/metrics", scoped=True)
        return result

    def logs(self, job_id: str, after: int = 0) -> builtins.list[JobLogOut]:
        """Log lines with an id above ``after``: ``[{id, attempt, level, message, time}]``."""
        result: builtins.list[JobLogOut] = self._c._json(
            "GET", f"/jobs/{job_id}/logs", scoped=True, params={"after": after}
        )
        return result

    def cancel(self, job_id: str) -> JobOut:
        """Ask the job to stop (a queued job ends at once, a running one at its next batch)."""
        result: JobOut = self._c._json("POST", f"/jobs/{job_id}/cancel", scoped=True)
        return result

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        on_update: Callable[[JobOut], None] | None = None,
    ) -> JobOut:
        """Poll until the job ends; returns it, whatever the outcome (check ``state``).

        ``on_update`` receives the job at every poll. Raises ``TimeoutError`` after
        ``timeout`` seconds; the job keeps running on the server.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)


class Models(_Group):
    """The model registry: names, numbered versions, aliases, bundle downloads."""

    def list(self, limit: int = 50, offset: int = 0) -> Page[ModelOut]:
        result: Page[ModelOut] = self._c._json(
            "GET", "/models", scoped=True, params={"limit": limit, "offset": offset}
        )
        return result

    def all(self, *, page_size: int = 100) -> Iterator[ModelOut]:
        """Every model, fetched a page at a time."""
        return self._c._pages("/models", page_size)

    def get(self, name: str) -> ModelOut:
        """``{name, latest_version, aliases: {alias: version}, created_at}``."""
        result: ModelOut = self._c._json("GET", f"/models/{name}", scoped=True)
        return result

    def versions(self, name: str, limit: int = 50, offset: int = 0) -> Page[VersionOut]:
        result: Page[VersionOut] = self._c._json(
            "GET",
            f"/models/{name}/versions",
            scoped=True,
            params={"limit": limit, "offset": offset},
        )
        return result

    def version(self, name: str, version: str | int = "latest") -> VersionOut:
        """One version by number, ``latest`` or alias: metrics, summary, lineage ids."""
        result: VersionOut = self._c._json("GET", f"/models/{name}/versions/{version}", scoped=True)
        return result

    def set_alias(self, name: str, alias: str, version: str | int) -> ModelOut:
        result: ModelOut = self._c._json(
            "PUT", f"/models/{name}/aliases/{alias}", scoped=True, json={"version": version}
        )
        return result

    def delete_alias(self, name: str, alias: str) -> ModelOut:
        result: ModelOut = self._c._json("DELETE", f"/models/{name}/aliases/{alias}", scoped=True)
        return result

    def download(self, name: str, version: str | int = "latest", *, dest: str | Path = ".") -> Path:
        """Fetch a version's bundle into ``dest``; the bundle directory (``dest/<name>-v<n>``).

        ``kiln.load()`` reads the result. An existing directory of that name is never
        overwritten (``ConflictError``).
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".kiln-download-", dir=dest) as tmp:
            archive = Path(tmp) / "bundle.tar.gz"
            path = f"{API}/models/{name}/versions/{version}/bundle"
            params = {"project": self._c.project} if self._c.project else None
            try:
                with self._c._http.stream("GET", path, params=params) as response:
                    if not response.is_success:
                        response.read()
                        raise error_of(response, self._c.url)
                    with archive.open("wb") as fh:
                        for chunk in response.iter_bytes(1 << 20):
                            fh.write(chunk)
            except httpx.TransportError as exc:
                raise ServiceError(
                    f"cannot reach the kiln server at {self._c.url}: {exc}"
                ) from None
            staged = extract_bundle(archive, Path(tmp) / "out")
            target = dest / staged.name
            if target.exists():
                raise ConflictError(f"{target} already exists; not overwriting it", field="dest")
            shutil.move(str(staged), target)
        return target


class Deployments(_Group):
    """Named endpoints serving registered versions, with weighted routes; predictions.

    ``create`` and ``update`` return once the versions are loaded and warm. Settings
    (``backend``, ``max_batch_size``, ``max_delay_ms``, ``max_queue``, ``timeout_ms``)
    left out keep the server's defaults (or, on update, their current values).
    """

    def create(
        self, name: str, model: str, version: str | int = "latest", **settings: Any
    ) -> DeploymentOut:
        """Deploy ``version`` (number, ``latest`` or alias) of ``model`` as ``name``."""
        body = {"name": name, "model": model, "version": version, **settings}
        result: DeploymentOut = self._c._json(
            "POST", "/deployments", scoped=True, json=body, timeout=self._deploy_timeout()
        )
        return result

    def list(self) -> list[DeploymentOut]:
        result: list[DeploymentOut] = self._c._json("GET", "/deployments", scoped=True)
        return result

    def get(self, name: str) -> DeploymentOut:
        """``{name, model, state, error, routes: [{version, weight, backend, ...}], ...}``."""
        result: DeploymentOut = self._c._json("GET", f"/deployments/{name}", scoped=True)
        return result

    def update(
        self,
        name: str,
        *,
        version: str | int | None = None,
        routes: Mapping[str | int, int] | Sequence[Mapping[str, str | int]] | None = None,
        **settings: Any,
    ) -> DeploymentOut:
        """Hot swap to ``version``, or split traffic with ``routes``; and/or change settings.

        ``routes`` is ``{version: weight}`` (``{3: 90, 4: 10}``) or a list of
        ``{"version", "weight"}``; a single route is a rollback.
        """
        body: dict[str, object] = dict(settings)
        if version is not None:
            body["version"] = version
        if routes is not None:
            if isinstance(routes, Mapping):
                body["routes"] = [{"version": v, "weight": w} for v, w in routes.items()]
            else:
                body["routes"] = [dict(r) for r in routes]
        result: DeploymentOut = self._c._json(
            "PATCH", f"/deployments/{name}", scoped=True, json=body, timeout=self._deploy_timeout()
        )
        return result

    def delete(self, name: str) -> None:
        """Stop serving ``name``; requests it already queued are answered first."""
        self._c._send("DELETE", f"{API}/deployments/{name}", scoped=True)

    def predict(self, name: str, rows: Any) -> PredictOut:
        """Predictions for ``rows`` (a list of ``{column: value}`` or a DataFrame).

        Returns ``{predictions, probabilities, labels, model, version}``; ``version``
        says which route answered. Missing values in a DataFrame are sent as null.
        """
        result: PredictOut = self._c._json(
            "POST", f"/deployments/{name}/predict", scoped=True, json={"inputs": records(rows)}
        )
        return result

    def _deploy_timeout(self) -> httpx.Timeout:
        current = self._c._http.timeout
        return httpx.Timeout(
            connect=current.connect,
            read=max(current.read or 0.0, DEPLOY_TIMEOUT),
            write=current.write,
            pool=current.pool,
        )


class Quotas(_Group):
    """Per-project limits on usage kinds (``compute_seconds``, ``worker_seconds``,
    ``stored_bytes``, ``prediction_requests``, ``prediction_rows``) per ``day``, ``month``
    or in ``total``.

    Past one, the call that would use more is refused (``QuotaError``, HTTP 429).
    Rate limits are quotas too: ``requests_inference`` or ``requests_api`` per ``second``
    or ``minute`` (``set("requests_inference", 20, period="second")``); past one, a
    request made with the project's keys is refused with ``RateLimitError``.
    Only a global admin key sets them; any key with ``read`` lists its project's.
    """

    def set(
        self,
        kind: str,
        limit: float | None,
        *,
        period: str = "day",
        project: str | None = None,
    ) -> QuotaOut:
        """Set the quota (``limit=None`` removes it); ``{project, kind, period, limit, used}``.

        ``project`` defaults to the client's project, else the server's default project.
        """
        body = {"kind": kind, "period": period, "limit": limit, "project": project}
        result: QuotaOut = self._c._json("PUT", "/quotas", scoped=True, json=body)
        return result

    def remove(self, kind: str, *, period: str = "day", project: str | None = None) -> QuotaOut:
        """Remove a quota (doing so twice is fine)."""
        return self.set(kind, None, period=period, project=project)

    def list(self) -> list[QuotaOut]:
        """The project's quotas: ``[{project, kind, period, limit, used}]``."""
        result: list[QuotaOut] = self._c._json("GET", "/quotas", scoped=True)
        return result

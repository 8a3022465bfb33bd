"""``kiln serve BUNDLE_DIR``: one bundle behind the platform's inference endpoints, alone.

The same application as ``kiln up`` answers (``/api/v1/deployments/{name}/predict``,
the KServe v2 routes, ``/metrics``, ``/healthz``, ``/readyz``), over a throwaway
platform: a temporary ``KILN_HOME`` (database, artifacts, model cache) that is
removed when the server stops. The bundle is registered there as version 1 of its
model and deployed under the same name once the server starts. A generation or an
embedding bundle is answered by the OpenAI-compatible routes (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``; the deployment's name is the request's
``model``), and ``--max-batch-size`` is the sequences its engine decodes at once.

The only credential is one static key (``--api-key``, ``KILN_SERVE_API_KEY``, or a
random one printed once) whose principal holds the ``predict`` and ``read`` scopes
in the ``default`` project: it cannot train, deploy, or manage keys. No admin key
exists. Ctrl-C or SIGTERM stops the server (queued requests are answered first).
"""

from __future__ import annotations

import errno
import json
import secrets
import shlex
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from kiln.errors import ConflictError, ServiceError, SpecError
from kiln.settings import Settings, apply_threads

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy.orm import Session

    from kiln.bundle import Bundle
    from kiln.data.preprocess_state import JSONScalar
    from kiln.manifest import BundleMeta
    from kiln.serve.deployments import Live, Loaded, NewDeployment
    from kiln.services import Services
    from kiln.store.tables import Project

MIN_KEY_LENGTH = 16
VERSION_PREFIX = "serve"
"""The artifact key's last segment for the bundle (``projects/default/models/<name>/serve``)."""
LM_TASKS = frozenset({"generation", "embedding"})
"""Bundles answered by the OpenAI-compatible routes (``/v1/...``) instead of predict."""


@dataclass(frozen=True)
class ServeOptions:
    """What ``kiln serve`` was asked for."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    name: str | None = None
    backend: str = "auto"
    max_batch_size: int = 32
    max_delay_ms: float = 5.0


def serve(
    bundle_dir: str | Path,
    options: ServeOptions,
    *,
    settings: Settings | None = None,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Serve ``bundle_dir`` until interrupted; the temporary home is removed on return.

    Raises the KilnError of a bad bundle, name, key or port before anything listens;
    one raised while deploying (an image model, ``backend="onnx"`` that cannot
    export) after the server stopped again.
    """
    from kiln.bundle import Bundle
    from kiln.lm_bundle_files import manifest_task, read_verified_manifest
    from kiln.store.projects import check_name

    out = echo or _print
    base = settings or Settings()
    apply_threads(base)  # KILN_THREADS: torch's, and onnxruntime's (it takes torch's count)
    key = options.api_key or base.serve_api_key
    generated = key is None
    key = check_key(key) if key is not None else secrets.token_urlsafe(32)
    path = Path(bundle_dir)
    # a language model is only checked here (manifest and hashes): the server loads it
    lm = manifest_task(path) in LM_TASKS
    bundle = None if lm else Bundle.load(path)
    meta = read_verified_manifest(path) if bundle is None else bundle.meta
    name = options.name or meta.name
    check_name(
        name,
        field="name",
        what="deployment name" if options.name else "the bundle's name (choose one with --name)",
    )
    sock = listen(options.host, options.port)
    options = replace(options, port=sock.getsockname()[1])  # the port the OS chose for 0
    home = Path(tempfile.mkdtemp(prefix="kiln-serve-"))
    try:
        with _term_as_interrupt():
            _run(path, meta, bundle, name, key, generated, sock, home, base, options, out)
    finally:
        sock.close()
        shutil.rmtree(home, ignore_errors=True)


def check_key(key: str) -> str:
    """A static key must be long and plain: 16+ printable ASCII characters, no spaces."""
    if len(key) < MIN_KEY_LENGTH or not all(33 <= ord(c) < 127 for c in key):
        raise SpecError(
            f"the API key must be at least {MIN_KEY_LENGTH} printable ASCII characters "
            "without spaces",
            field="api_key",
        )
    return key


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (bound now, so a taken port fails early)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SpecError(f"cannot resolve --host {host!r}: {exc.strerror}", field="host") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(f"{where} is already in use", field="port") from None
        raise ServiceError(f"cannot listen on {where}: {exc.strerror}", field="port") from None
    return sock


@dataclass
class _Startup:
    """What the lifespan hook hands back to the main thread."""

    error: BaseException | None = None


def _run(
    bundle_dir: Path,
    meta: BundleMeta,
    bundle: Bundle | None,  # None: a generation or embedding bundle
    name: str,
    key: str,
    generated: bool,
    sock: socket.socket,
    home: Path,
    base: Settings,
    options: ServeOptions,
    out: Callable[[str], None],
) -> None:
    import uvicorn

    from kiln.app import build_services, create_app
    from kiln.serve.deployments import NewDeployment
    from kiln.store.deployments import DeploymentConfig

    settings = base.model_copy(
        update={"home": home, "database_url": None, "artifacts": None, "data_roots": []}
    )
    services = build_services(settings)
    try:
        project = register(services, bundle_dir, meta, name)
        services.static_key = key
        app = create_app(settings, services=services)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        startup = _Startup()
        spec = NewDeployment(
            name=name,
            model=name,
            version=1,
            config=DeploymentConfig(
                backend=options.backend,
                max_batch_size=options.max_batch_size,
                max_delay_ms=options.max_delay_ms,
                max_queue=256,
                timeout_ms=10_000.0,
            ),
        )

        def ready(live: Live) -> None:
            if not server.should_exit:
                new_key = key if generated else None
                lines = (
                    lm_banner(options, name, live, new_key)
                    if bundle is None
                    else banner(options, name, bundle, live, new_key)
                )
                for line in lines:
                    out(line)

        _deploy_on_startup(app, project, spec, server, startup, ready)
        # the Ctrl-C (or SIGTERM) that stopped the server is raised again by uvicorn
        with suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        if startup.error is not None:
            raise startup.error
        out("kiln serve stopped")
    finally:
        services.db.dispose()


def register(services: Services, bundle_dir: Path, meta: BundleMeta, name: str) -> Project:
    """Store the bundle and register it as version 1 of ``name`` in the default project."""
    from kiln.services import STATIC_PRINCIPAL
    from kiln.store.artifacts import safe_key
    from kiln.store.projects import DEFAULT_PROJECT, ensure_project
    from kiln.store.registry import register_version, registering

    prefix = safe_key("projects", DEFAULT_PROJECT, "models", name, VERSION_PREFIX)
    services.store.put_dir(prefix, bundle_dir)
    size = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file())

    def work(s: Session) -> Project:
        project = ensure_project(s, DEFAULT_PROJECT)
        register_version(
            s,
            project,
            name,
            artifact_key=prefix,
            task=meta.task,
            metrics=meta.metrics,
            summary={
                "model": meta.model.type,
                "parameters": meta.parameters,
                "epochs_run": meta.training.epochs_run,
                "seconds": meta.training.seconds,
                "device": meta.training.device,
                "source": "kiln serve",
            },
            size_bytes=size,
        )
        return project

    project = registering(services.db, name, work)
    # the static key's principal names the project by id: a fresh database's first row
    if project.id != STATIC_PRINCIPAL.project_id:
        raise RuntimeError(f"the default project has id {project.id}, not 1")
    return project


def _deploy_on_startup(
    app: FastAPI,
    project: Project,
    spec: NewDeployment,
    server: Any,
    startup: _Startup,
    ready: Callable[[Live], None],
) -> None:
    """Wrap the app's lifespan so the deployment exists before the first request.

    A failure is kept for the caller and the server told to stop, rather than raised
    inside the lifespan (where uvicorn would print a traceback and exit with its own code).
    """
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            try:
                live = await app_.state.deployments.create(project, spec)
            except Exception as exc:
                startup.error = exc
                server.should_exit = True
            else:
                ready(live)
            yield state

    app.router.lifespan_context = lifespan


def banner(
    options: ServeOptions, name: str, bundle: Bundle, live: Live, new_key: str | None
) -> list[str]:
    """What ``kiln serve`` prints once the deployment is warm: where, what, how to call it."""
    route = live.routes[0]
    model = route.batcher.model
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{host}:{options.port}"
    ref = "booster" if bundle.meta.model.type == "gbdt" else "torch"
    parity = f", max |onnx - {ref}| {model.parity:.1e}" if model.parity is not None else ""
    meta = bundle.meta
    lines = [
        f"kiln serve: {meta.name} ({meta.task}, {len(meta.input_schema)} inputs) on "
        f"{model.backend_name}{parity}; batches of up to {options.max_batch_size} rows "
        f"or {options.max_delay_ms:g} ms",
        f"  URL:         {url}  (OpenAPI: {url}/docs)",
        f"  deployment:  {name}",
    ]
    if new_key is not None:
        lines.append(
            f"  API key:     {new_key}  (generated, shown once; choose one with --api-key "
            "or KILN_SERVE_API_KEY)"
        )
    else:
        lines.append("  API key:     the one given (--api-key or KILN_SERVE_API_KEY)")
    auth = '-H "Authorization: Bearer $KEY" -H "Content-Type: application/json"'
    row = example_row(bundle)
    lines += [
        "Predict (with KEY set to the API key):",
        f"  curl -s {url}/api/v1/deployments/{name}/predict {auth} \\",
        f"    -d {shlex.quote(json.dumps({'inputs': [row]}))}",
        "KServe v2 (Open Inference Protocol):",
        f"  curl -s {url}/v2/models/{name}/infer {auth} \\",
        f"    -d {shlex.quote(json.dumps(v2_example(bundle, row)))}",
        f"Health: {url}/healthz, {url}/readyz (no key); Prometheus: {url}/metrics (the key). "
        "Ctrl-C stops.",
    ]
    return lines


def lm_banner(options: ServeOptions, name: str, live: Live, new_key: str | None) -> list[str]:
    """The banner of a generation or embedding bundle: examples of the OpenAI-compatible
    routes (chat or completions, embeddings) instead of predict and KServe v2."""
    served = live.routes[0].served
    meta = served.meta
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{host}:{options.port}"
    if meta.task == "generation":
        what = f"up to {options.max_batch_size} sequences decoded at once"
    else:
        what = f"{meta.n_outputs}-dimensional vectors"
    lines = [
        f"kiln serve: {meta.name} ({meta.task}, {meta.parameters:,} parameters) on "
        f"{served.backend_name}; {what}",
        f"  URL:         {url}  (OpenAPI: {url}/docs; OpenAI-compatible: {url}/v1)",
        f"  deployment:  {name}  (the requests' model)",
    ]
    if new_key is not None:
        lines.append(
            f"  API key:     {new_key}  (generated, shown once; choose one with --api-key "
            "or KILN_SERVE_API_KEY)"
        )
    else:
        lines.append("  API key:     the one given (--api-key or KILN_SERVE_API_KEY)")
    auth = '-H "Authorization: Bearer $KEY" -H "Content-Type: application/json"'
    lines += [
        f"{_lm_title(served)} (with KEY set to the API key):",
        *_lm_example(url, name, served, auth),
        f"  or any OpenAI client: OpenAI(base_url={url + '/v1'!r}, api_key=KEY)",
        f"Health: {url}/healthz, {url}/readyz (no key); Prometheus: {url}/metrics (the key). "
        "Ctrl-C stops.",
    ]
    return lines


def _lm_title(served: Loaded) -> str:
    from kiln.serve.lm import ServedLM

    if not isinstance(served, ServedLM):
        return "Embeddings"
    return "Chat" if served.bundle.generation.prompt_format == "chat" else "Completions"


def _lm_example(url: str, name: str, served: Loaded, auth: str) -> list[str]:
    """The curl command of one request to the route that serves ``served``."""
    from kiln.serve.lm import ServedLM

    body: dict[str, object]
    if not isinstance(served, ServedLM):
        route, body = "embeddings", {"model": name, "input": ["some text"]}
    elif served.bundle.generation.prompt_format == "chat":
        route = "chat/completions"
        body = {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}
    else:
        route, body = "completions", {"model": name, "prompt": "Hello", "max_tokens": 32}
    lines = [f"  curl -s {url}/v1/{route} {auth} \\", f"    -d {shlex.quote(json.dumps(body))}"]
    if isinstance(served, ServedLM):
        lines.append('  (add "stream": true for server-sent events)')
    return lines


class V2Tensor(TypedDict):
    """One input tensor of a KServe v2 request."""

    name: str
    shape: list[int]
    datatype: str  # FP32 or BYTES
    data: list[JSONScalar]


class V2Request(TypedDict):
    inputs: list[V2Tensor]


def example_row(bundle: Bundle) -> dict[str, JSONScalar]:
    """One plausible input row: numeric columns at their training mean, a known category."""
    state = bundle.preprocessor.state
    values: dict[str, JSONScalar] = {}
    for feature in state.features:
        if feature.kind == "numeric":
            values[feature.name] = round(feature.center, 3)
        else:
            values[feature.name] = feature.categories[0] if feature.categories else "a"
    row: dict[str, JSONScalar] = {}
    for column in bundle.meta.input_schema:
        default: JSONScalar = "some text" if column.kind in ("text", "image") else 0.0
        row[column.name] = values.get(column.name, default)
    return row


def v2_example(bundle: Bundle, row: dict[str, JSONScalar]) -> V2Request:
    """A KServe v2 request for ``row``: one FP32 matrix, or one tensor per column."""
    columns = bundle.meta.input_schema
    if all(c.kind == "numeric" for c in columns):
        data: list[JSONScalar] = [float(row[c.name]) for c in columns]
        tensor: V2Tensor = {
            "name": "input",
            "shape": [1, len(data)],
            "datatype": "FP32",
            "data": data,
        }
        return {"inputs": [tensor]}
    inputs: list[V2Tensor] = []
    for c in columns:
        value = row[c.name]
        datatype = "FP32" if isinstance(value, int | float) else "BYTES"
        inputs.append({"name": c.name, "shape": [1], "datatype": datatype, "data": [value]})
    return {"inputs": inputs}


@contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM stops ``kiln serve`` as Ctrl-C does (and so still removes its home)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print(line: str) -> None:
    print(line, flush=True)

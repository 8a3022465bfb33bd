"""``kiln serve`` (one bundle, alone) and ``kiln deployments`` (on a kiln server).

The server's modules load when a command runs, so ``kiln --help`` stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.model_cmds import OutCsv
from kiln.cli.options import JsonOut, Remote, require_local_input, with_remote
from kiln.cli.render import console, print_json, table

if TYPE_CHECKING:
    from kiln.client.shapes import DeploymentOut, RouteOut

Backend = Literal["auto", "torch", "onnx"]
BackendOpt = Annotated[
    Backend | None,
    typer.Option(
        "--backend",
        help="auto: onnxruntime on the CPU when its export agrees with torch, else torch "
        "\\[default: auto].",
        show_default=False,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--max-batch-size",
        min=1,
        max=4096,
        help="Rows a batch closes at \\[default: 32].",
        show_default=False,
    ),
]
Delay = Annotated[
    float | None,
    typer.Option(
        "--max-delay-ms",
        min=0,
        max=1000,
        help="Milliseconds a batch waits for more rows \\[default: 5].",
        show_default=False,
    ),
]
Queue = Annotated[
    int | None,
    typer.Option(
        "--max-queue",
        min=1,
        help="Requests waiting per version before 503 \\[default: 256].",
        show_default=False,
    ),
]
Timeout = Annotated[
    float | None,
    typer.Option(
        "--timeout-ms",
        min=1,
        help="A request still waiting after this gets 504 \\[default: 10000].",
        show_default=False,
    ),
]
NameArg = Annotated[str, typer.Argument(help="The deployment's name.", show_default=False)]
SHOWN_ROWS = 20


# --- kiln serve -------------------------------------------------------------------


@reports_errors
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", show_default=False)],
    host: Annotated[
        str,
        typer.Option("--host", help="Interface to bind; anything but 127.0.0.1 exposes the model."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="The key callers send (16+ characters; the process list shows options, so "
            "prefer KILN_SERVE_API_KEY on shared machines) \\[default: KILN_SERVE_API_KEY, "
            "else a new random key, printed once].",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The deployment's name \\[default: the bundle's name].",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            "--backend",
            help="auto: onnxruntime on the CPU when its export agrees with torch, else torch.",
        ),
    ] = "auto",
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            min=1,
            max=4096,
            help="Rows a batch closes at; a generation model: sequences decoded at once.",
        ),
    ] = 32,
    max_delay_ms: Annotated[
        float,
        typer.Option("--max-delay-ms", min=0, max=1000, help="Milliseconds a batch waits."),
    ] = 5.0,
) -> None:
    """Serve one bundle over HTTP, alone: the platform's predict, KServe v2 and metrics routes.

    A generation or embedding bundle is served on the OpenAI-compatible routes
    (/v1/chat/completions, /v1/completions, /v1/embeddings) instead.

    Nothing is kept: the server's database and artifacts live in a temporary folder,
    removed when it stops. Requests need the one API key, which may predict and read
    only. Ctrl-C stops the server.
    """
    from kiln.standalone import ServeOptions
    from kiln.standalone import serve as run_serve

    options = ServeOptions(
        host=host,
        port=port,
        api_key=api_key,
        name=name,
        backend=backend,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
    )
    run_serve(bundle, options)


# --- kiln deployments -------------------------------------------------------------

deployments_app = typer.Typer(
    help="Deployments on a kiln server: serve registered versions, swap, canary, predict.",
    no_args_is_help=True,
)


def _version(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _routes(row: DeploymentOut) -> str:
    return ", ".join(
        f"v{r['version']} {r['weight']}%" if len(row["routes"]) > 1 else f"v{r['version']}"
        for r in _weights(row["routes"])
    )


def _weights(routes: list[RouteOut]) -> list[RouteOut]:
    """Routes with their weights as percentages of the total."""
    total = sum(r["weight"] for r in routes) or 1
    return [{**r, "weight": round(100 * r["weight"] / total)} for r in routes]


def _summary(row: DeploymentOut) -> None:
    backends = sorted({r["backend"] for r in row["routes"]})
    console.print(
        f"deployment [bold]{escape(row['name'])}[/]: model {escape(row['model'])} "
        f"{_routes(row)} on {', '.join(backends) or '-'}, {row['state']}"
        + (f" ({escape(row['error'])})" if row["error"] else "")
    )


@deployments_app.command("create")
@reports_errors
@with_remote()
def deployments_create(
    name: NameArg,
    model: Annotated[str, typer.Option("--model", "-m", help="The registered model's name.")],
    version: Annotated[
        str, typer.Option("--version", "-v", help="A version number, 'latest' or an alias.")
    ] = "latest",
    backend: BackendOpt = None,
    max_batch_size: BatchSize = None,
    max_delay_ms: Delay = None,
    max_queue: Queue = None,
    timeout_ms: Timeout = None,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Deploy a version (needs 'deploy'); returns once it is loaded and warm."""
    settings = {
        "backend": backend,
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "max_queue": max_queue,
        "timeout_ms": timeout_ms,
    }
    with remote.client() as client:
        row = client.deployments.create(
            name, model, _version(version), **{k: v for k, v in settings.items() if v is not None}
        )
    if json_out:
        print_json(row)
        return
    _summary(row)
    console.print(f"predict: POST /api/v1/deployments/{escape(row['name'])}/predict")


@deployments_app.command("list")
@reports_errors
@with_remote()
def deployments_list(*, remote: Remote, json_out: JsonOut = False) -> None:
    """Deployments of the project."""
    with remote.client() as client:
        rows = client.deployments.list()
    if json_out:
        print_json(rows)
        return
    out = table("deployments", "name", "model", "routes", "backend", "state", "batching")
    for row in rows:
        out.add_row(
            escape(row["name"]),
            escape(row["model"]),
            _routes(row),
            ", ".join(sorted({r["backend"] for r in row["routes"]})),
            row["state"],
            f"{row['max_batch_size']} rows / {row['max_delay_ms']:g} ms",
        )
    console.print(out)


@deployments_app.command("show")
@reports_errors
@with_remote()
def deployments_show(
    name: NameArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """A deployment: its routes (version, traffic share, backend, queue) and batching."""
    with remote.client() as client:
        row = client.deployments.get(name)
    if json_out:
        print_json(row)
        return
    _render(row)


def _render(row: DeploymentOut) -> None:
    _summary(row)
    console.print(
        f"batching: up to {row['max_batch_size']} rows or {row['max_delay_ms']:g} ms; "
        f"queue {row['max_queue']} requests; timeout {row['timeout_ms']:g} ms; "
        f"backend {row['backend']}"
    )
    out = table("routes", "version", "traffic", "backend", "queued")
    for route in _weights(row["routes"]):
        out.add_row(
            f"v{route['version']}",
            f"{route['weight']}%",
            route["backend"],
            str(route["queue_depth"]),
        )
    console.print(out)


@deployments_app.command("swap")
@reports_errors
@with_remote()
def deployments_swap(
    name: NameArg,
    version: Annotated[str, typer.Argument(help="A version number, 'latest' or an alias.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Hot swap: load VERSION beside the current one, then send all traffic to it."""
    with remote.client() as client:
        row = client.deployments.update(name, version=_version(version))
    if json_out:
        print_json(row)
        return
    _render(row)


def _parse_route(text: str) -> dict[str, int | str]:
    from kiln.errors import SpecError

    version, sep, weight = text.partition("=")
    if not sep or not version or not weight.strip().isdigit():
        raise SpecError(f"--route {text!r}: expected VERSION=WEIGHT, e.g. 3=90", field="routes")
    return {"version": _version(version.strip()), "weight": int(weight)}


@deployments_app.command("canary")
@reports_errors
@with_remote()
def deployments_canary(
    name: NameArg,
    route: Annotated[
        list[str],
        typer.Option(
            "--route",
            "-r",
            help="VERSION=WEIGHT, e.g. --route 3=90 --route 4=10 (weights are relative).",
        ),
    ],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Split traffic between versions (canary, or a rollback with one route)."""
    routes = [_parse_route(r) for r in route]
    with remote.client() as client:
        row = client.deployments.update(name, routes=routes)
    if json_out:
        print_json(row)
        return
    _render(row)


@deployments_app.command("delete")
@reports_errors
@with_remote()
def deployments_delete(
    name: NameArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Stop serving a deployment (queued requests are answered first)."""
    with remote.client() as client:
        client.deployments.delete(name)
    if json_out:
        print_json({"name": name, "deleted": True})
        return
    console.print(f"deleted deployment {escape(name)}")


@deployments_app.command("predict")
@reports_errors
@with_remote()
def deployments_predict(
    name: NameArg,
    file: Annotated[str, typer.Argument(help="Rows to predict (.csv, .tsv, .jsonl or .parquet).")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
    csv_out: OutCsv = None,
) -> None:
    """Send a table's rows to a deployment (needs 'predict'); one request."""
    from kiln.data.csv_safe import predictions_table, separator, write_csv
    from kiln.data.sources import read_table

    if csv_out is not None:
        separator(csv_out)  # a wrong suffix fails before the request
    require_local_input(file, field="file")
    frame = read_table(file)
    with remote.client() as client:
        result = client.deployments.predict(name, frame)
    if csv_out is not None:
        rows = predictions_table(frame, result["predictions"], result.get("probabilities"))
        write_csv(rows, csv_out)
    if json_out:
        print_json(result)
        return
    predictions = result["predictions"]
    probabilities = result.get("probabilities")
    out = table(
        f"{result['model']} v{result['version']}: {len(predictions)} prediction(s)",
        "row",
        "prediction",
        *(["probability"] if probabilities else []),
    )
    for i, prediction in enumerate(predictions[:SHOWN_ROWS]):
        cells = [str(i), _cell(prediction)]
        if probabilities:
            cells.append(f"{max(probabilities[i]):.3f}")
        out.add_row(*cells)
    console.print(out)
    if len(predictions) > SHOWN_ROWS:
        console.print(f"... {len(predictions) - SHOWN_ROWS} more rows; use --json for all")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return escape(value if isinstance(value, str) else json.dumps(value))

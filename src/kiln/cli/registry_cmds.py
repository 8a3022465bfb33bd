"""``kiln models``: the model registry on a kiln server (versions, aliases, downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, Limit, Offset, Remote, with_remote
from kiln.cli.render import console, metrics_table, page_note, print_json, table, when

if TYPE_CHECKING:
    from kiln.client import JSON

models_app = typer.Typer(
    help="The model registry: versions, aliases, downloads.", no_args_is_help=True
)
NameArg = Annotated[str, typer.Argument(help="The model's name (its spec's name).")]
VersionArg = Annotated[
    str, typer.Argument(help="A version number, 'latest' or an alias.", show_default=True)
]


@models_app.command("list")
@reports_errors
@with_remote()
def models_list(
    limit: Limit = 50,
    offset: Offset = 0,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Registered models with their latest version and aliases."""
    with remote.client() as client:
        page = client.models.list(limit=limit, offset=offset)
    if json_out:
        print_json(page)
        return
    out = table("models", "name", "latest", "aliases", "created")
    for row in page["items"]:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(row["aliases"].items()))
        out.add_row(
            escape(row["name"]), f"v{row['latest_version']}", aliases, when(row["created_at"])
        )
    console.print(out)
    page_note(page)


def _headline(metrics: JSON) -> str:
    test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
    for key in ("accuracy", "rmse"):
        if isinstance(test, dict) and key in test:
            return f"test {key} {test[key]:.4f}"
    return ""


@models_app.command("versions")
@reports_errors
@with_remote()
def models_versions(
    name: NameArg,
    limit: Limit = 50,
    offset: Offset = 0,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """The versions of a model, newest first."""
    with remote.client() as client:
        page = client.models.versions(name, limit=limit, offset=offset)
    if json_out:
        print_json(page)
        return
    out = table(f"versions of {name}", "version", "aliases", "metric", "model", "job", "created")
    for row in page["items"]:
        out.add_row(
            f"v{row['version']}",
            ", ".join(row["aliases"]),
            _headline(row["metrics"]),
            str(row["summary"].get("model", "")),
            row["job_id"] or "",
            when(row["created_at"]),
        )
    console.print(out)
    page_note(page)


@models_app.command("show")
@reports_errors
@with_remote()
def models_show(
    name: NameArg,
    version: VersionArg = "latest",
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """One version: its metrics, what it is and where it came from."""
    with remote.client() as client:
        row = client.models.version(name, version)
    if json_out:
        print_json(row)
        return
    summary = row["summary"]
    aliases = f"  aliases: {', '.join(row['aliases'])}" if row["aliases"] else ""
    console.print(f"[bold]{escape(row['model'])}[/] v{row['version']} ({row['task']}){aliases}")
    console.print(
        f"{summary.get('model')}, {summary.get('parameters', 0):,} parameters, "
        f"{summary.get('epochs_run')} epochs in {summary.get('seconds')} s on "
        f"{summary.get('device')}; bundle {row['size_bytes']:,} bytes"
    )
    console.print(
        f"job {row['job_id']}, dataset {row['dataset_id']}, created {when(row['created_at'])}"
    )
    splits = {k: v for k, v in row["metrics"].items() if isinstance(v, dict)}
    if splits:
        console.print(metrics_table("held-out metrics", splits))


@models_app.command("alias")
@reports_errors
@with_remote()
def models_alias(
    name: NameArg,
    alias: Annotated[str, typer.Argument(help="e.g. production, staging.")],
    version: Annotated[str, typer.Argument(help="A version number, 'latest' or another alias.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Point an alias at a version (needs the 'deploy' scope)."""
    with remote.client() as client:
        row = client.models.set_alias(name, alias, int(version) if version.isdigit() else version)
    if json_out:
        print_json(row)
        return
    console.print(f"{escape(name)}: {escape(alias)} → v{row['aliases'][alias]}")


@models_app.command("unalias")
@reports_errors
@with_remote()
def models_unalias(
    name: NameArg,
    alias: Annotated[str, typer.Argument(help="The alias to remove.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Remove an alias (the version stays)."""
    with remote.client() as client:
        row = client.models.delete_alias(name, alias)
    if json_out:
        print_json(row)
        return
    console.print(f"{escape(name)}: removed alias {escape(alias)}")


@models_app.command("download")
@reports_errors
@with_remote()
def models_download(
    name: NameArg,
    version: VersionArg = "latest",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to put the bundle directory in.")
    ] = Path("."),
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Download a version's bundle to OUT/<name>-v<n> (what kiln predict and kiln.load read)."""
    with remote.client() as client:
        path = client.models.download(name, version, dest=out)
    if json_out:
        print_json({"model": name, "bundle": str(path)})
        return
    console.print(f"saved bundle: [bold]{escape(str(path))}[/]")

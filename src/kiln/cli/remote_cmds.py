"""``kiln projects|keys|datasets``: the tenants, their API keys and their tables.

Each command makes one client call and renders it: a Rich table, or ``--json``. The
server, key and project come from the options in :mod:`kiln.cli.options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, Limit, Offset, Remote, flag, with_remote
from kiln.cli.render import console, err_console, page_note, print_json, table, when

if TYPE_CHECKING:
    from kiln.client.shapes import DatasetOut


# --- projects ---------------------------------------------------------------------

projects_app = typer.Typer(
    help="Projects: the tenant boundary (a global admin key).", no_args_is_help=True
)


@projects_app.command("create")
@reports_errors
@with_remote(project=False)
def projects_create(
    name: Annotated[str, typer.Argument(help="a-z, 0-9, '-' and '_'.", show_default=False)],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Create a project."""
    with remote.client() as client:
        row = client.projects.create(name)
    if json_out:
        print_json(row)
        return
    console.print(f"created project [bold]{escape(row['name'])}[/]")


@projects_app.command("list")
@reports_errors
@with_remote(project=False)
def projects_list(*, remote: Remote, json_out: JsonOut = False) -> None:
    """The projects this key may act on."""
    with remote.client() as client:
        rows = client.projects.list()
    if json_out:
        print_json(rows)
        return
    out = table("projects", "name", "created")
    for row in rows:
        out.add_row(row["name"], when(row["created_at"]))
    console.print(out)


# --- keys -------------------------------------------------------------------------

keys_app = typer.Typer(help="API keys (an admin key).", no_args_is_help=True)


@keys_app.command("create")
@reports_errors
@with_remote(project=False)
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", "-s", help="admin, read, train, deploy or predict; repeat for more."
        ),
    ],
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            help="The key's project \\[default: KILN_PROJECT; with neither, a global admin "
            "key issues a global key, valid in every project].",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "",
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Issue an API key. Its secret is printed this once; only a hash is stored."""
    with remote.client() as client:
        row = client.keys.create(scope, project=project or client.project, name=name)
    if json_out:
        print_json(row)
        return
    where = f"project {row['project']}" if row["project"] else "every project (global key)"
    console.print(f"created key {row['id']} ({', '.join(row['scopes'])}) for {escape(where)}:")
    print(row["key"])
    err_console.print("[yellow]This key is shown once only; store it now.[/]")


@keys_app.command("list")
@reports_errors
@with_remote(project=False)
def keys_list(*, remote: Remote, json_out: JsonOut = False) -> None:
    """Keys this admin key manages (never their secrets)."""
    with remote.client() as client:
        rows = client.keys.list()
    if json_out:
        print_json(rows)
        return
    out = table("API keys", "id", "name", "project", "scopes", "created", "last used", "revoked")
    for row in rows:
        out.add_row(
            row["id"],
            escape(row["name"]),
            row["project"] or "[dim](global)[/]",
            ", ".join(row["scopes"]),
            when(row["created_at"]),
            when(row["last_used_at"]),
            when(row["revoked_at"]) if row["revoked_at"] else "",
        )
    console.print(out)


@keys_app.command("revoke")
@reports_errors
@with_remote(project=False)
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (not its secret).")],
    yes: Annotated[
        bool, flag("--yes", "-y", help="Confirm revoking the key this command runs with.")
    ] = False,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Revoke a key; requests made with it fail from now on.

    The key this command runs with needs --yes; the last global admin key cannot be
    revoked (create another first: kiln keys create --scope admin).
    """
    with remote.client() as client:
        row = client.keys.revoke(key_id, confirm_self=yes)
    if json_out:
        print_json(row)
        return
    console.print(f"revoked key {row['id']}")


# --- datasets ---------------------------------------------------------------------

datasets_app = typer.Typer(help="Tables stored on the server, for jobs.", no_args_is_help=True)


def _dataset_summary(row: DatasetOut) -> None:
    console.print(
        f"dataset [bold]{row['id']}[/] ({escape(row['name'])}, {row['format']}): "
        f"{row['rows']:,} rows, {len(row['columns'])} columns, {row['size_bytes']:,} bytes"
    )
    console.print(f"use in a spec as  data.source: [bold]{row['ref']}[/]")


@datasets_app.command("upload")
@reports_errors
@with_remote()
def datasets_upload(
    file: Annotated[
        Path,
        typer.Argument(help="A .csv, .tsv, .jsonl or .parquet table, or a .zip/.tar.gz of images."),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Default: the file name.", show_default=False)
    ] = None,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Upload a local table; the server checks it can be read before storing it."""
    with remote.client() as client:
        row = client.datasets.upload(file, name=name)
    if json_out:
        print_json(row)
        return
    _dataset_summary(row)


@datasets_app.command("import")
@reports_errors
@with_remote()
def datasets_import(
    uri: Annotated[
        str, typer.Argument(help="s3://bucket/key, or a path under the server's KILN_DATA_ROOTS.")
    ],
    name: Annotated[str, typer.Option("--name", help="The dataset's name.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Have the server copy a table it can reach and register it."""
    with remote.client() as client:
        row = client.datasets.import_uri(uri, name=name)
    if json_out:
        print_json(row)
        return
    _dataset_summary(row)


@datasets_app.command("list")
@reports_errors
@with_remote()
def datasets_list(
    limit: Limit = 50,
    offset: Offset = 0,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Datasets of the project, newest first."""
    with remote.client() as client:
        page = client.datasets.list(limit=limit, offset=offset)
    if json_out:
        print_json(page)
        return
    out = table("datasets", "id", "name", "format", "rows", "columns", "bytes", "created")
    for row in page["items"]:
        out.add_row(
            row["id"],
            escape(row["name"]),
            row["format"],
            f"{row['rows']:,}",
            str(len(row["columns"])),
            f"{row['size_bytes']:,}",
            when(row["created_at"]),
        )
    console.print(out)
    page_note(page)


@datasets_app.command("show")
@reports_errors
@with_remote()
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="ds_... (or dataset:ds_...).")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """A dataset and its columns."""
    with remote.client() as client:
        row = client.datasets.get(dataset_id.removeprefix("dataset:"))
    if json_out:
        print_json(row)
        return
    _dataset_summary(row)
    console.print(f"source {escape(row['source'])}, fingerprint {row['fingerprint']}")
    out = table("columns", "name", "kind", "dtype")
    for column in row["columns"]:
        out.add_row(escape(column["name"]), column["kind"], column["dtype"])
    console.print(out)

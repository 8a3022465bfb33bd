"""``kiln base-models add|list|show|remove``: the server's base-model catalog.

Through the API like ``kiln projects`` and ``kiln keys`` (the key defaults to the admin
key ``kiln up`` wrote). ``add`` needs a global admin key, and the SOURCE is read by the
server, so it is a path on the server's machine; a relative path is made absolute here
first, which is right when this command runs there (the usual case).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, Remote, with_remote
from kiln.cli.render import console, print_json, table, when

if TYPE_CHECKING:
    from kiln.client.shapes import BaseModelOut

base_models_app = typer.Typer(
    help="Base models jobs on the server may fine-tune (model.path: base:<name>).",
    no_args_is_help=True,
)


def _absolute(source: str) -> str:
    """A local path as an absolute one; ``pkg:`` and hub ids as they are."""
    if source.startswith("pkg:"):
        return source
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        return str(path.resolve())
    return source


def _size(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB" if n >= 1 << 20 else f"{n:,} B"


def _summary(row: BaseModelOut) -> None:
    console.print(
        f"[bold]{escape(row['ref'])}[/] ({row['kind']}, {len(row['files'])} files, "
        f"{_size(row['size_bytes'])})  sha256 {row['sha256']}"
    )
    if row["source"] is not None:  # shown to global admin keys only
        console.print(f"from {escape(row['source'])}")


@base_models_app.command("add")
@reports_errors
@with_remote(project=False)
def add(
    name: Annotated[str, typer.Argument(help="a-z, 0-9, '.', '_' and '-'; specs use base:NAME.")],
    source: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face model directory, a GGUF file, pkg:<package>/<dir>, or a "
            "hub id (only if the server sets KILN_ALLOW_HUB=1)."
        ),
    ],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Register a base model: its files are copied into the artifact store and pinned by
    SHA-256 (a global admin key)."""
    with remote.client() as client:
        row = client.base_models.add(name, _absolute(source))
    if json_out:
        print_json(row)
        return
    console.print("registered ", end="")
    _summary(row)
    console.print(f"use in a server spec as  model.path: [bold]{escape(row['ref'])}[/]")


@base_models_app.command("list")
@reports_errors
@with_remote(project=False)
def list_(*, remote: Remote, json_out: JsonOut = False) -> None:
    """The catalog (any key with the read scope)."""
    with remote.client() as client:
        rows = client.base_models.list()
    if json_out:
        print_json(rows)
        return
    out = table("base models", "ref", "kind", "files", "size", "sha256", "source", "added")
    for row in rows:
        out.add_row(
            escape(row["ref"]),
            row["kind"],
            str(len(row["files"])),
            _size(row["size_bytes"]),
            row["sha256"][:12],
            escape(row["source"] or "-"),
            when(row["created_at"]),
        )
    console.print(out)


@base_models_app.command("show")
@reports_errors
@with_remote(project=False)
def show(
    name: Annotated[str, typer.Argument(help="The catalog name.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """One base model with every pinned file and its SHA-256."""
    with remote.client() as client:
        row = client.base_models.get(name)
    if json_out:
        print_json(row)
        return
    _summary(row)
    out = table("files", "path", "size", "sha256")
    for f in row["files"]:
        out.add_row(escape(f["path"]), _size(f["size"]), f["sha256"])
    console.print(out)


@base_models_app.command("remove")
@reports_errors
@with_remote(project=False)
def remove(
    name: Annotated[str, typer.Argument(help="The catalog name.")],
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Remove a base model and its files (a global admin key); jobs naming it then fail."""
    with remote.client() as client:
        row = client.base_models.remove(name)
    if json_out:
        print_json(row)
        return
    console.print(f"removed {escape(row['ref'])}")

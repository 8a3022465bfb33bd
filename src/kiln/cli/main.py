"""Entry point of the ``kiln`` console script.

Importing this module must stay cheap (no torch): commands import what they need
when they run, so ``kiln --help`` answers instantly.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kiln import __version__
from kiln.cli import (
    catalog_cmds,
    compress_cmds,
    jobs_cmds,
    lm_cmds,
    model_cmds,
    platform_cmds,
    registry_cmds,
    remote_cmds,
    serve_cmds,
    train_cmds,
    usage_cmds,
)
from kiln.cli.help import UnixGroup, conventional_help

app = typer.Typer(
    name="kiln",
    help="Train, evaluate and serve models from a declarative spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=UnixGroup,
)

app.command()(train_cmds.train)
app.command()(train_cmds.crossval)
app.command()(model_cmds.evaluate)
app.command()(model_cmds.predict)
app.command()(model_cmds.inspect)
app.command()(lm_cmds.generate)
app.command()(lm_cmds.chat)
app.command("import")(lm_cmds.import_model)
app.command()(compress_cmds.compress)
app.command()(compress_cmds.export)
app.command()(platform_cmds.up)
app.command()(platform_cmds.worker)
app.command()(serve_cmds.serve)
app.add_typer(remote_cmds.projects_app, name="projects")
# local commands on the server machine (they need the master key, not an API key)
remote_cmds.keys_app.command("rotate-master")(platform_cmds.rotate_master)
remote_cmds.keys_app.command("encrypt-existing")(platform_cmds.encrypt_existing)
app.add_typer(remote_cmds.keys_app, name="keys")
app.add_typer(remote_cmds.datasets_app, name="datasets")
app.add_typer(jobs_cmds.jobs_app, name="jobs")
app.add_typer(registry_cmds.models_app, name="models")
app.add_typer(serve_cmds.deployments_app, name="deployments")
app.command()(usage_cmds.usage)
app.add_typer(usage_cmds.quotas_app, name="quotas")
app.add_typer(catalog_cmds.base_models_app, name="base-models")
conventional_help(app)  # every command's --help reads like Unix help


def _version(value: bool) -> None:
    if value:
        print(f"kiln {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, metavar="", help="Print the version."
        ),
    ] = False,
) -> None:
    """Train, evaluate and serve models from a declarative spec."""


def main() -> None:
    app()


if __name__ == "__main__":  # python -m kiln.cli.main
    main()

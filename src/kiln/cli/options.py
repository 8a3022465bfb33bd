"""The options many commands share, declared once, and the server they name.

Every command that talks to a server takes ``--url`` and ``--api-key`` (and most
``--project``): :func:`with_remote` adds them to a command, which receives them as one
:class:`Remote`. The values come from those options, else ``KILN_URL``,
``KILN_API_KEY``, ``KILN_PROJECT``; with no key anywhere, the admin key ``kiln up``
wrote to ``$KILN_HOME/admin.key`` is used (and that is said on stderr).

Boolean options are flags (``--json``, ``--follow``): given or not, they take no value,
so :func:`flag` declares them with no value type in the help.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pathlib import Path

    from kiln.client import Client


def require_local_input(source: str, *, field: str) -> None:
    """A NotFoundError naming ``field`` (the argument) when ``source``, a local path,
    does not exist; URIs (``s3://...``) and ``sklearn:<name>`` are left to the reader."""
    from pathlib import Path

    from kiln.errors import NotFoundError

    if "://" in source or source.startswith("sklearn:") or Path(source).exists():
        return
    raise NotFoundError(f"input file not found: {source}", field=field)


def flag(*names: str, help: str) -> Any:
    """A boolean option that is given or not (``--resume``); the help shows no ``<bool>``."""
    return typer.Option(*names, help=help, metavar="")


RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="A Ray cluster (host:port or auto) for specs with train.resources; "
        "default: KILN_RAY_ADDRESS.",
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The kiln server \\[default: KILN_URL or http://127.0.0.1:8080].",
        show_default=False,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key \\[default: KILN_API_KEY, else $KILN_HOME/admin.key].",
        show_default=False,
    ),
]
ProjectOpt = Annotated[
    str | None,
    typer.Option(
        "--project",
        help="Project a global admin key acts on \\[default: KILN_PROJECT, else 'default'].",
        show_default=False,
    ),
]
JsonOut = Annotated[bool, flag("--json", help="Print one JSON document on stdout.")]
Limit = Annotated[int, typer.Option("--limit", min=1, max=500, help="Rows per page.")]
Offset = Annotated[int, typer.Option("--offset", min=0, help="Rows to skip.")]

# The options with_remote adds, in the order the help lists them.
_REMOTE_OPTIONS: dict[str, object] = {"url": UrlOpt, "api_key": ApiKeyOpt, "project": ProjectOpt}


@dataclass(frozen=True)
class Remote:
    """The server, key and project a command's options name (``None``: not given)."""

    url: str | None = None
    api_key: str | None = None
    project: str | None = None

    def client(self) -> Client:
        """A client from the options, else the settings, else the local admin key file."""
        from kiln.client import Client
        from kiln.settings import Settings

        settings = Settings()
        key = self.api_key or settings.api_key or _admin_key(settings.admin_key_file)
        return Client(self.url or settings.url, key, project=self.project or settings.project)


def _admin_key(path: Path) -> str:
    """The key ``kiln up`` wrote to ``path``, said on stderr; an AuthError if there is none."""
    from rich.markup import escape

    from kiln.cli.render import err_console
    from kiln.errors import AuthError

    if not path.is_file():
        raise AuthError(
            "no API key: pass --api-key or set KILN_API_KEY "
            f"(kiln up writes its admin key to {path})",
            field="api_key",
        )
    err_console.print(f"[dim]using the admin key in {escape(str(path))}[/]", highlight=False)
    return path.read_text(encoding="utf-8").strip()


def with_remote(*, project: bool = True) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command ``--url``, ``--api-key`` and (unless ``project=False``) ``--project``.

    The command declares a ``remote: Remote`` parameter; the options take its place in
    the command's signature (and so in its help, in that order), and the command is
    called with them as one ``Remote``. A missing key is raised by ``remote.client()``,
    inside the command, where ``@reports_errors`` reports it.
    """
    names = [name for name in _REMOTE_OPTIONS if project or name != "project"]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index("remote")
        kind = params[at].kind
        options = [
            inspect.Parameter(name, kind, default=None, annotation=_REMOTE_OPTIONS[name])
            for name in names
        ]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> None:
            remote = Remote(**{name: kwargs.pop(name, None) for name in names})
            command(*args, remote=remote, **kwargs)

        # Typer reads the parameters from the signature and their types from the
        # annotations: both name the options in place of ``remote``.
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*params[:at], *options, *params[at + 1 :]]
        )
        run.__annotations__ = {
            **{p.name: p.annotation for p in params if p.name != "remote"},
            **{name: _REMOTE_OPTIONS[name] for name in names},
        }
        return run

    return decorate

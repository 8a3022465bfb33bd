"""Map KilnError to a one-line message on stderr and the error's exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from kiln.errors import KilnError

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(fn: F) -> F:
    """Decorate a command so a KilnError exits with its code and no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KilnError as exc:
            from rich.markup import escape

            from kiln.cli.render import err_console

            where = f" (field: {exc.field})" if exc.field and exc.field not in exc.message else ""
            err_console.print(
                f"[bold red]error:[/] {escape(exc.message + where)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]

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
            _report(exc)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            setting = _bad_setting(exc)
            if setting is None:
                raise
            _report(setting)
            raise typer.Exit(setting.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _report(exc: KilnError) -> None:
    from rich.markup import escape

    from kiln.cli.render import err_console

    where = f" (field: {exc.field})" if exc.field and exc.field not in exc.message else ""
    err_console.print(
        f"[bold red]error:[/] {escape(exc.message + where)}", highlight=False, soft_wrap=True
    )


def _bad_setting(exc: Exception) -> KilnError | None:
    """A KILN_* environment variable that failed validation, as a one-line error naming
    it (pydantic is loaded by then: only Settings() raised this)."""
    from pydantic import ValidationError

    from kiln.errors import SpecError

    if not isinstance(exc, ValidationError) or exc.title != "Settings" or not exc.errors():
        return None
    first = exc.errors()[0]
    name = f"KILN_{str(first['loc'][0]).upper()}" if first["loc"] else "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    return SpecError(f"{name}: {message}", field=name)

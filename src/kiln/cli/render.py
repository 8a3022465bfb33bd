"""Rich rendering of results: metric tables, predictions, model summaries, and the
list tables of the commands that talk to a server."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kiln.client.shapes import Page

console = Console()
err_console = Console(stderr=True)


def when(stamp: str | None) -> str:
    """An API timestamp (ISO 8601, UTC) for a table cell."""
    return stamp[:19].replace("T", " ") if stamp else "-"


def table(title: str, *columns: str) -> Table:
    """A table whose first column and ids (values to copy) never wrap."""
    out = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        out.add_column(column, no_wrap=i == 0 or column in ("id", "job"))
    return out


def page_note(page: Page[Any]) -> None:
    """Under a page of a list: how many rows of how many, and the next page's offset."""
    shown = len(page["items"])
    if page["next_offset"] is not None:
        console.print(
            f"{shown} of {page['total']} shown; next page: --offset {page['next_offset']}"
        )


def print_json(data: Any) -> None:
    """One JSON document on stdout (no Rich markup), for machines."""
    print(json.dumps(data, indent=2, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def metrics_table(title: str, columns: Mapping[str, Mapping[str, object]]) -> Table:
    """Scalar metrics as rows, one column per split (e.g. test / val)."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    keys: list[str] = []
    for values in columns.values():
        keys += [k for k, v in values.items() if _scalar(v) and k not in keys]
    for key in keys:
        table.add_row(key, *(_fmt(values.get(key)) for values in columns.values()))
    return table


def confusion_table(matrix: list[list[int]], labels: list[Any]) -> Table:
    table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for label in labels:
        table.add_column(str(label), justify="right")
    for label, row in zip(labels, matrix, strict=True):
        table.add_row(str(label), *(str(v) if v else "[dim]0[/]" for v in row))
    return table


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def rounds_word(model_type: str) -> str:
    """What a model's training history counts: boosting rounds for trees, else epochs."""
    return "round" if model_type == "gbdt" else "epoch"

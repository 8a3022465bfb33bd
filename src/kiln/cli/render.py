"""Rich rendering of results: metric tables, predictions, model summaries."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """One JSON document on stdout (no Rich markup), for machines."""
    print(json.dumps(data, indent=2, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def metrics_table(title: str, columns: dict[str, dict[str, Any]]) -> Table:
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

"""``kiln evaluate``, ``kiln predict`` and ``kiln inspect``: commands over a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, require_local_input
from kiln.cli.render import confusion_table, console, metrics_table, print_json

BundleArg = Annotated[Path, typer.Argument(help="Bundle directory.", show_default=False)]
OutCsv = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Also write the rows with their predictions to FILE (.csv or .tsv); cells a "
        "spreadsheet would run as formulas are prefixed with '.",
    ),
]

# Rows shown in the predictions table; --json prints every row.
SHOWN_ROWS = 20


@reports_errors
def evaluate(
    bundle: BundleArg,
    data: Annotated[str, typer.Argument(help="Labelled table (csv/parquet/jsonl path or URI).")],
    json_out: JsonOut = False,
) -> None:
    """Metrics of a bundle on labelled data (held-out rows it was not trained on)."""
    from kiln.bundle import Bundle

    require_local_input(data, field="data")
    b = Bundle.load(bundle)
    metrics = b.evaluate(data)
    if json_out:
        print_json(metrics)
        return
    console.print(metrics_table(f"{b.name} on {data}", {"value": metrics}))
    if "confusion_matrix" in metrics and b.meta.labels is not None:
        console.print(confusion_table(metrics["confusion_matrix"], b.meta.labels))


@reports_errors
def predict(
    bundle: BundleArg,
    input: Annotated[str, typer.Argument(help="Rows to predict (.csv or .jsonl).")],
    json_out: JsonOut = False,
    out: OutCsv = None,
) -> None:
    """Predict labels (and class probabilities) or values for each input row."""
    from kiln.bundle import Bundle
    from kiln.data.csv_safe import predictions_table, separator, write_csv

    if out is not None:
        separator(out)  # a wrong suffix fails before any work
    require_local_input(input, field="input")
    b = Bundle.load(bundle)
    rows = b.read(input)
    result = b.predict(rows)
    if out is not None:
        write_csv(predictions_table(rows, result.predictions, result.probabilities), out)
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title=f"{b.name}: {len(rows)} prediction(s)", title_justify="left")
    table.add_column("row", justify="right")
    table.add_column("prediction")
    if result.probabilities is not None:
        table.add_column("probability", justify="right")
    target = b.meta.target
    image = b.preprocessor.state.image
    if image is not None:
        table.add_column("image")
    if target in rows.columns:
        table.add_column(f"{target} (given)")
    for i, pred in enumerate(result.predictions[:SHOWN_ROWS]):
        cells = [str(i), str(pred) if result.probabilities else f"{pred:.4f}"]
        if result.probabilities is not None:
            cells.append(f"{max(result.probabilities[i]):.3f}")
        if image is not None:
            cells.append(Path(str(rows[image.column].iloc[i])).name)
        if target in rows.columns:
            cells.append(str(rows[target].iloc[i]))
        table.add_row(*cells)
    console.print(table)
    if len(rows) > SHOWN_ROWS:
        console.print(f"... {len(rows) - SHOWN_ROWS} more rows; use --json for all")


def _encoded(bundle: Any) -> str:
    pre = bundle.preprocessor
    if pre.kind == "text":
        return (
            f"tokens (vocabulary {bundle.meta.n_inputs:,}, max length {pre.state.text.max_length})"
        )
    if pre.kind == "image":
        return f"images {pre.input_shape} (C, H, W)"
    return f"{bundle.meta.n_inputs} features"


@reports_errors
def inspect(bundle: BundleArg, json_out: JsonOut = False) -> None:
    """Summarise a bundle: layers, shapes, parameter counts, metrics, lineage."""
    from kiln.bundle import Bundle
    from kiln.manifest import DataRecord
    from kiln.models.summary import summarize

    b = Bundle.load(bundle)
    rows = summarize(b.model, b.example_input())
    meta = b.meta
    if json_out:
        print_json(
            {
                **meta.model_dump(mode="json", exclude={"training"}),
                "training": meta.training.model_dump(mode="json", exclude={"history"}),
                "layers": [r.__dict__ for r in rows],
            }
        )
        return
    console.print(
        f"[bold]{meta.name}[/]  {meta.task}, {meta.model.type}, "
        f"{meta.parameters:,} parameters, created {meta.created_at} by kiln {meta.kiln_version}"
    )
    kinds: dict[str, int] = {}
    for column in meta.input_schema:
        kinds[column.kind] = kinds.get(column.kind, 0) + 1
    console.print(
        f"inputs: {len(meta.input_schema)} columns ("
        + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + f") -> {_encoded(b)}; target {meta.target!r}"
        + (f" with {len(meta.labels)} classes" if meta.labels else "")
    )
    layers = Table(title="layers", title_justify="left")
    for col, just in (
        ("layer", "left"),
        ("type", "left"),
        ("output shape", "right"),
        ("parameters", "right"),
    ):
        layers.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        layers.add_row(r.name, r.kind, str(r.output_shape), f"{r.params:,}")
    layers.add_row("", "[bold]total[/]", "", f"[bold]{meta.parameters:,}[/]")
    console.print(layers)
    splits = {k: v for k, v in meta.metrics.items() if isinstance(v, dict)}
    if splits:
        console.print(metrics_table("metrics", splits))
    data = meta.lineage.data or DataRecord()
    split = meta.lineage.split
    t = meta.training
    console.print(
        f"data: {data.source} ({(data.fingerprint or '')[:19]}…), split train/val/test = "
        + (f"{split.train}/{split.val}/{split.test}" if split else "None/None/None")
    )
    console.print(
        f"training: {t.epochs_run} epochs, loss {t.loss}, "
        f"best epoch {t.best_epoch}, {t.seconds}s on {t.device}"
    )

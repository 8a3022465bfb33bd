"""``kiln evaluate``, ``kiln predict`` and ``kiln inspect``: commands over a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, require_local_input
from kiln.cli.render import (
    confusion_table,
    console,
    err_console,
    metrics_table,
    print_json,
    rounds_word,
)

if TYPE_CHECKING:
    from kiln.models.gbdt import TreeSummary
    from kiln.models.summary import LayerRow

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
    data: Annotated[
        str,
        typer.Argument(
            help="Labelled table (csv/parquet/jsonl path or URI); for a generation bundle, "
            "chat, completion or text JSON lines."
        ),
    ],
    json_out: JsonOut = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Generation bundles: write each example's prompt, reference and generated "
            "answer with its scores to FILE (JSON lines).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Generation bundles: new tokens per answer."),
    ] = None,
) -> None:
    """Metrics of a bundle on labelled data (held-out rows it was not trained on).

    A generation bundle reports loss and perplexity, and for chat and completion data
    the share of exact, normalised and JSON-equal answers and ROUGE-L, from greedy answers
    to each example's last turn.
    """
    from kiln.bundle import Bundle
    from kiln.lm_bundle_files import manifest_task

    require_local_input(data, field="data")
    if manifest_task(bundle) == "generation":
        _evaluate_lm(bundle, data, json_out=json_out, out=out, max_tokens=max_tokens)
        return
    if out is not None or max_tokens is not None:
        from kiln.errors import SpecError

        raise SpecError("--out and --max-tokens apply to generation bundles", field="--out")
    b = Bundle.load(bundle)
    metrics = b.evaluate(data)
    if json_out:
        print_json(metrics)
        return
    console.print(metrics_table(f"{b.name} on {data}", {"value": metrics}))
    if "confusion_matrix" in metrics and b.meta.labels is not None:
        console.print(confusion_table(metrics["confusion_matrix"], b.meta.labels))


def _evaluate_lm(
    bundle: Path, data: str, *, json_out: bool, out: Path | None, max_tokens: int | None
) -> None:
    """``kiln evaluate`` of a generation bundle."""
    import dataclasses
    import json

    from kiln.lm_bundle import LMBundle
    from kiln.settings import apply_threads, get_settings

    apply_threads(get_settings())
    b = LMBundle.load(bundle)
    with err_console.status(f"evaluating {b.name} on {data}"):
        result = b.evaluate(data, max_new_tokens=max_tokens)
    if out is not None:
        with out.open("w", encoding="utf-8") as fh:
            for answer, score in zip(result.answers, result.scores, strict=True):
                row = {**dataclasses.asdict(answer), **dataclasses.asdict(score)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if json_out:
        print_json(result.metrics)
        return
    console.print(metrics_table(f"{b.name} on {data}", {"value": result.metrics}))
    if out is not None:
        console.print(f"per-example answers: [bold]{out}[/]")


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
    from kiln.lm_bundle_files import manifest_task
    from kiln.manifest import DataRecord
    from kiln.models.gbdt import GBDTModel
    from kiln.models.summary import summarize

    if manifest_task(bundle) in ("generation", "embedding"):
        _inspect_lm(bundle, json_out=json_out)
        return
    b = Bundle.load(bundle)
    trees = b.model.summary() if isinstance(b.model, GBDTModel) else None
    rows = [] if trees is not None else summarize(b.model, b.example_input())
    meta = b.meta
    if json_out:
        print_json(
            {
                **meta.model_dump(mode="json", exclude={"training"}),
                "training": meta.training.model_dump(mode="json", exclude={"history"}),
                "layers": [r.__dict__ for r in rows],
                **({"trees": _trees_doc(trees)} if trees is not None else {}),
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
    if trees is not None:  # a layer table says nothing about trees
        console.print(
            f"trees: {trees.library}, {trees.rounds} rounds, {trees.trees} trees, "
            f"{trees.leaves:,} leaves"
        )
        console.print(_importance_table(trees))
    else:
        console.print(_layer_table(rows, meta.parameters))
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
    unit = rounds_word(meta.model.type)
    console.print(
        f"training: {t.epochs_run} {unit}s, loss {t.loss}, "
        f"best {unit} {t.best_epoch}, {t.seconds}s on {t.device}"
    )


# Features shown in ``kiln inspect``'s importance table; --json lists every one.
SHOWN_FEATURES = 20


def _layer_table(rows: list[LayerRow], parameters: int) -> Table:
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
    layers.add_row("", "[bold]total[/]", "", f"[bold]{parameters:,}[/]")
    return layers


def _importance_table(trees: TreeSummary) -> Table:
    """The top features by total split gain, with their share of all gain."""
    total = sum(gain for _, gain in trees.importance) or 1.0
    table = Table(title="importance (total gain)", title_justify="left")
    table.add_column("feature", justify="left")
    table.add_column("gain", justify="right")
    table.add_column("share", justify="right")
    for name, gain in trees.importance[:SHOWN_FEATURES]:
        table.add_row(name, f"{gain:,.4g}", f"{gain / total:.1%}")
    if len(trees.importance) > SHOWN_FEATURES:
        table.add_row(f"... {len(trees.importance) - SHOWN_FEATURES} more", "", "")
    return table


def _trees_doc(trees: TreeSummary) -> dict[str, object]:
    """``kiln inspect --json``'s ``trees``: the booster's size and every feature's gain."""
    return {
        "library": trees.library,
        "rounds": trees.rounds,
        "trees": trees.trees,
        "leaves": trees.leaves,
        "importance": [{"feature": name, "gain": gain} for name, gain in trees.importance],
    }


def _inspect_lm(bundle: Path, *, json_out: bool) -> None:
    """``kiln inspect`` of a generation or embedding bundle (no layer table: an LM's
    hundreds of layers say less than its config)."""
    from kiln.lm_bundle_files import read_verified_manifest

    meta = read_verified_manifest(bundle)
    config = meta.model_context.get("hf_config", {})
    generation = (bundle / "generation.json").read_text() if meta.task == "generation" else None
    if json_out:
        doc = meta.model_dump(mode="json", exclude={"training", "model_context"})
        doc["training"] = meta.training.model_dump(mode="json", exclude={"history"})
        if generation is not None:
            import json

            doc["generation"] = json.loads(generation)
        print_json(doc)
        return
    arch = config.get("architectures") if isinstance(config, dict) else None
    family = arch[0] if isinstance(arch, list) and arch else None
    if family is None and isinstance(config, dict):
        family = config.get("model_type")
    console.print(
        f"[bold]{meta.name}[/]  {meta.task}, {meta.model.type}"
        + (f" ({family})" if family else "")
        + f", {meta.parameters:,} parameters, created {meta.created_at} by kiln {meta.kiln_version}"
    )
    if isinstance(config, dict):
        keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
        console.print(", ".join(f"{k} {config[k]}" for k in keys if k in config))
    console.print(
        f"runtime: {meta.runtime.backend}"
        + (f", {meta.runtime.quantization}" if meta.runtime.quantization else "")
    )
    splits = {k: v for k, v in meta.metrics.items() if isinstance(v, dict)}
    if splits:
        console.print(metrics_table("metrics", splits))
    t = meta.training
    if t.epochs_run:
        tokens = f", {t.tokens.trained:,} trained tokens per epoch" if t.tokens else ""
        unit = rounds_word(meta.model.type)
        console.print(
            f"training: {t.epochs_run} {unit}s{tokens}, best {unit} {t.best_epoch}, "
            f"{t.seconds}s on {t.device}"
        )
    parent = meta.lineage.parent
    if parent is not None:
        console.print(f"from: {parent.name or parent.path}")

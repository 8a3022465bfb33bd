"""``kiln compress`` and ``kiln export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kiln.cli.errors import reports_errors
from kiln.cli.options import flag
from kiln.cli.render import console, err_console, print_json
from kiln.monitor.units import binary_size

if TYPE_CHECKING:
    from kiln.compress.pipeline import CompressResult


@reports_errors
def compress(
    spec: Annotated[Path, typer.Argument(help="Compress spec (YAML or JSON).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the variants.")],
    report: Annotated[bool, flag("--report", help="Print the full trade-off table.")] = False,
    runs: Annotated[int, typer.Option("--runs", min=30, help="Timed runs per latency.")] = 50,
    quiet: Annotated[bool, flag("--quiet", "-q", help="No progress lines.")] = False,
    json_out: Annotated[bool, flag("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Distill, prune and quantize a bundle; each step is a new, measured bundle."""
    from kiln.compress.pipeline import CompressToleranceError
    from kiln.compress.pipeline import compress as run
    from kiln.settings import apply_threads, get_settings

    apply_threads(get_settings())
    show = not quiet and not json_out

    def event(message: str) -> None:
        if show:
            err_console.print(f"[dim]·[/] {message}", highlight=False)

    try:
        result = run(spec, out, on_event=event, measure_runs=runs)
    except CompressToleranceError as exc:
        _write_report(exc.partial, out)  # the variants that fitted still get their report
        raise
    table, chart = _write_report(result, out)
    if json_out:
        reports = [result.source.report, *(v.report for v in result.variants)]
        print_json({"metric": result.metric, "variants": table, "reports": reports})
        return
    # Many columns: do not squeeze them into a non-terminal's default 80 characters.
    wide = console if console.is_terminal else Console(width=240)
    if chart is None:  # a generation bundle's variants
        wide.print(_lm_table(table, result.metric))
        console.print(f"report: {out / 'report.json'}")
        return
    wide.print(_table(table, result.metric, full=report))
    console.print(f"report: {out / 'report.json'}   Pareto plot: {chart}")


def _write_report(result: CompressResult, out: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """``out/report.json`` and ``out/pareto.png`` for the source and its variants
    (generation bundles: report.json alone)."""
    from kiln.compress.lm_report import is_generation, lm_rows
    from kiln.compress.report import plot, rows

    names = ["source", *(v.name for v in result.variants)]
    reports = [result.source.report, *(v.report for v in result.variants)]
    generation = is_generation(result)
    table = lm_rows(reports, names) if generation else rows(reports, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps({"metric": result.metric, "variants": table, "reports": reports}, indent=2)
    )
    return table, None if generation else plot(table, result.metric, out / "pareto.png")


def _lm_table(table: list[dict[str, Any]], metric: str) -> Table:
    """Generation variants: size, greedy tokens/s at batch 1 and 8, first-token latency,
    the metric and its drop (relative for perplexity) with its 95% interval."""
    rows = table[0]["held_out_rows"]
    view = Table(
        title=f"compression trade-offs ({metric} on {rows} held-out examples, 95% CI)",
        title_justify="left",
    )
    cols = ["variant", "backend", "parameters", "size", "tok/s b1", "tok/s b8"]
    cols += ["first token ms", "perplexity", metric, "drop"]
    cols = list(dict.fromkeys(cols))  # perplexity as the metric: one column
    for c in cols:
        view.add_column(c, justify="left" if c in ("variant", "backend") else "right")
    for r in table:
        cells = {
            "variant": r["variant"],
            "backend": r["backend"],
            "parameters": f"{r['parameters']:,}",
            "size": binary_size(r["model_bytes"]),
            "tok/s b1": f"{r['tokens_per_s_b1']:,.0f}",
            "tok/s b8": f"{r['tokens_per_s_b8']:,.0f}",
            "first token ms": f"{r['first_token_ms']:.1f}",
            "perplexity": f"{r['perplexity']:.3f}",
            metric: f"{r[metric]:.4f}",
            "drop": f"{r['drop']:+.4f} [{r['drop_low']:+.3f}, {r['drop_high']:+.3f}]",
        }
        view.add_row(*(cells[c] for c in cols))
    return view


def _table(table: list[dict[str, Any]], metric: str, full: bool) -> Table:
    rows = table[0].get("held_out_rows")
    checked = f"; tolerance checked on {rows} held-out rows, 95% CI" if rows else ""
    view = Table(
        title=f"compression trade-offs ({metric} on the test split{checked})", title_justify="left"
    )
    cols = ["variant", "backend", "parameters", "size", "p50 b1 ms", metric, "drop"]
    cols += ["held-out", "held-out drop", "agree"]
    if full:
        cols[5:5] = ["p95 b1 ms", "p50 b32 ms", "rows/s", "peak MB", "non-zeros"]
    cols.append("pareto")
    for c in cols:
        view.add_column(c, justify="left" if c in ("variant", "backend") else "right")
    for r in table:
        front = [k for k, key in (("size", "pareto_size"), ("latency", "pareto_latency")) if r[key]]
        cells = {
            "variant": r["variant"],
            "backend": r["backend"],
            "parameters": f"{r['parameters']:,}",
            "size": binary_size(r["model_bytes"]),
            "p50 b1 ms": f"{r['p50_ms_b1']:.3f}",
            "p95 b1 ms": f"{r['p95_ms_b1']:.3f}",
            "p50 b32 ms": f"{r['p50_ms_b32']:.3f}",
            "rows/s": f"{r['rows_per_s']:,.0f}",
            "peak MB": f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-",
            "non-zeros": f"{r['nonzeros']:,}",
            metric: f"{r[metric]:.4f}",
            "drop": f"{r['drop']:+.4f}",
            "held-out": _with_interval(r, "held_out", "held_out_low", "held_out_high", ""),
            "held-out drop": _with_interval(r, "held_out_drop", "drop_low", "drop_high", "+"),
            "agree": f"{r['agreement']:.3f}",
            "pareto": ", ".join(front),
        }
        view.add_row(*(cells[c] for c in cols))
    return view


def _with_interval(r: dict[str, Any], value: str, low: str, high: str, sign: str) -> str:
    """``0.9583 [0.862, 0.989]``; "-" for a report without held-out figures."""
    if r.get(value) is None or r.get(low) is None:
        return "-"
    return f"{r[value]:{sign}.4f} [{r[low]:{sign}.3f}, {r[high]:{sign}.3f}]"


@reports_errors
def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", show_default=False)],
    format: Annotated[str, typer.Option("--format", "-f", help="Export format.")] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of into the bundle.")
    ] = None,
) -> None:
    """Export a bundle's model to ONNX (parity-checked against torch, or for boosted
    trees against the library's own predictor)."""
    from kiln.compress.export import export_bundle

    if format != "onnx":
        from kiln.errors import SpecError

        raise SpecError(f"unknown export format {format!r}; supported: onnx", field="format")
    path, diff = export_bundle(bundle, out)
    ref = "the booster" if _is_trees(bundle) else "torch"
    console.print(f"wrote {path} (max relative difference to {ref} {diff:.1e})")


def _is_trees(bundle: Path) -> bool:
    from kiln.bundle import META_FILE, read_json
    from kiln.manifest import parse_manifest

    meta = parse_manifest(read_json(bundle / META_FILE), str(bundle / META_FILE))
    return meta.model.type == "gbdt"

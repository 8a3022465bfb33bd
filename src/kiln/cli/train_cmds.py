"""``kiln train`` and ``kiln crossval``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, RayOpt, flag
from kiln.cli.render import console, err_console, metrics_table, print_json, rounds_word

if TYPE_CHECKING:
    from kiln.manifest import SelectionRecord
    from kiln.settings import Settings
    from kiln.spec.spec import Spec
    from kiln.train.executor import Executor

SpecArg = Annotated[Path, typer.Argument(help="Spec file (YAML or JSON).", show_default=False)]
Quiet = Annotated[bool, flag("--quiet", "-q", help="No progress bar.")]


@reports_errors
def train(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    resume: Annotated[
        bool, flag("--resume", help="Continue from the last epoch checkpoint.")
    ] = False,
    quiet: Quiet = False,
    log_jsonl: Annotated[
        Path | None, typer.Option("--log-jsonl", help="Append per-epoch JSON lines to FILE.")
    ] = None,
    force: Annotated[
        bool, flag("--force", help="Replace a bundle of another model in --out.")
    ] = False,
    ray: RayOpt = None,
    json_out: JsonOut = False,
) -> None:
    """Train the model a spec describes and save it as a bundle directory.

    A bundle already in --out is replaced when it is of the same model (retraining,
    said on stderr); one of another model only with --force. With --ray (or
    KILN_RAY_ADDRESS) and train.resources in the spec, training runs data-parallel on
    that Ray cluster.
    """
    from kiln.bundle import check_destination
    from kiln.evaluate.metrics import headline_metric, metric_value
    from kiln.settings import apply_threads, get_settings
    from kiln.spec import load_spec
    from kiln.train.callbacks import Callback, JsonlLog, ResumeHint, RichProgress
    from kiln.workflow import checkpoint_dir, fit

    parsed = load_spec(spec)
    settings = get_settings()
    apply_threads(settings)
    _say_replacing(out, check_destination(out, name=parsed.name, force=force), parsed.name)
    callbacks: list[Callback] = []
    if not quiet and not json_out:
        metric = parsed.train.early_stopping.metric if parsed.train.early_stopping else None
        if parsed.model.type == "auto":  # a line per candidate, then the winner's bar
            from kiln.train.auto import CandidateLines, primary_metric

            callbacks.append(CandidateLines(primary_metric(parsed.task)))
        callbacks.append(RichProgress(f"training {parsed.name}", metric=metric))
    if not quiet:
        callbacks.append(ResumeHint(checkpoint_dir(out)))  # after the bar, which stops first
    if log_jsonl is not None:
        callbacks.append(JsonlLog(log_jsonl))
    executor = _ray_executor(ray or settings.ray_address, settings)
    bundle = fit(parsed, out=out, resume=resume, callbacks=callbacks, executor=executor)
    tokens = bundle.meta.training.tokens
    if tokens is not None and tokens.truncated:
        lines = ", ".join(map(str, tokens.truncated_lines))
        more = ", ..." if tokens.truncated > len(tokens.truncated_lines) else ""
        err_console.print(
            f"note: {tokens.truncated} training example(s) were longer than model.max_length "
            f"and were cut at it (lines {lines}{more}); raise max_length to keep them whole",
            highlight=False,
        )
    if json_out:
        record = bundle.meta.training.model_dump(mode="json", exclude={"history"})
        print_json({"bundle": str(out), **bundle.metrics, "training": record})
        return
    training = bundle.meta.training
    unit = rounds_word(bundle.meta.model.type)
    note = f", early stop (best {unit} {training.best_epoch})" if training.stopped_early else ""
    console.print(
        f"trained [bold]{bundle.name}[/] in {training.seconds or 0:.1f}s, "
        f"{training.epochs_run} {unit}s{note}, on {training.device}{_where(parsed, executor)}"
    )
    if training.selection is not None:
        _print_selection(training.selection)
    splits = {k: v for k, v in bundle.metrics.items() if isinstance(v, dict)}
    if splits:
        console.print(metrics_table("held-out metrics", splits))
    headline = headline_metric(bundle.meta.task)
    if "test" in bundle.metrics:
        test = metric_value(bundle.metrics["test"], headline)
        console.print(f"test {headline}: [bold]{test:.4f}[/]")
    console.print(f"saved bundle: [bold]{out}[/]")


def _print_selection(selection: SelectionRecord) -> None:
    """The candidates of ``model.type: auto`` with their scores, and the winner."""
    from kiln.cli.render import table

    how = f"{selection.folds}-fold cv" if selection.method == "kfold" else "validation split"
    out = table("model selection", "candidate", selection.metric, "std")
    for c in selection.candidates:
        mark = " (winner)" if c.type == selection.winner else ""
        std = f"{c.std:.4f}" if c.std is not None else "-"
        out.add_row(f"{c.type}{mark}", f"{c.score:.4f}", std)
    console.print(out)
    console.print(f"selected model: [bold]{selection.winner}[/] (by {selection.metric}, {how})")


def _say_replacing(out: Path, held: str | None, name: str) -> None:
    """Say on stderr that ``out``'s bundle (of model ``held``) is about to be replaced."""
    if held is None:
        return
    from rich.markup import escape

    if held == name:
        note = f"retraining {name!r}: the new bundle replaces the one in {out}"
    else:
        note = f"--force: the new bundle of {name!r} replaces the one of {held!r} in {out}"
    err_console.print(escape(note), highlight=False)


@reports_errors
def crossval(
    spec: SpecArg,
    folds: Annotated[int, typer.Option("--folds", "-k", min=2, help="Number of folds.")] = 5,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """k-fold cross-validation: mean and std of each metric over folds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from kiln.evaluate.metrics import Metrics, headline_metric, metric_value
    from kiln.settings import apply_threads, get_settings
    from kiln.spec import load_spec
    from kiln.train.crossval import crossval as run_crossval

    parsed = load_spec(spec)
    apply_threads(get_settings())
    show = not quiet and not json_out
    progress = Progress(
        TextColumn("[bold]cross-validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        disable=not show,
    )
    headline = headline_metric(parsed.task)
    with progress:
        task = progress.add_task("folds", total=folds, status="")

        def on_fold(i: int, metrics: Metrics) -> None:
            value = metric_value(metrics, headline)
            chose = f" ({metrics['selected']})" if "selected" in metrics else ""
            status = f"fold {i + 1}{chose}: {headline} {value:.4f}"
            progress.update(task, advance=1, status=status)

        result = run_crossval(parsed, folds, on_fold=on_fold)
    if json_out:
        print_json(result.to_dict())
        return
    table = metrics_table(
        f"{folds}-fold cross-validation of {parsed.name}",
        {"mean": result.mean, "std": result.std},
    )
    console.print(table)
    console.print(f"{headline}: [bold]{result.mean[headline]:.4f}[/] ± {result.std[headline]:.4f}")


def _ray_executor(address: str | None, settings: Settings) -> Executor | None:
    """The Ray cluster a spec with ``train.resources`` trains on (None: this process)."""
    if not address:
        return None
    from kiln.jobs.executors.ray import RayExecutor

    return RayExecutor(
        address,
        timeout=settings.ray_resource_timeout,
        max_failures=settings.ray_max_failures,
    )


def _where(spec: Spec, executor: Executor | None) -> str:
    """`` x 2 Ray workers`` when the run was handed to a Ray cluster."""
    resources = spec.train.resources
    if executor is None or resources is None or spec.model.type in ("gbdt", "auto"):
        return ""
    return f" x {resources.workers} Ray worker{'s' if resources.workers > 1 else ''}"

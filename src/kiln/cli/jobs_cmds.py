"""``kiln jobs``: submit, follow, inspect and cancel jobs on a kiln server.

Following a job (``submit --follow``, ``wait``) exits 0 when it succeeded, with the
exit code of its error when it failed (7 for an error kiln has no class for), 1 when
it was cancelled, and 130 on Ctrl-C, which stops following, not the job.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, Limit, Offset, Remote, flag, with_remote
from kiln.cli.render import console, err_console, metrics_table, page_note, print_json, table, when

if TYPE_CHECKING:
    from kiln.client import Client
    from kiln.client.shapes import JobLogOut, JobOut, JobResources, JobResult

# Seconds between polls of a followed job: fresh enough for a person, cheap for the server.
POLL_SECONDS = 0.5

jobs_app = typer.Typer(
    help="Training, cross-validation, evaluation and compression jobs.", no_args_is_help=True
)
JobArg = Annotated[str, typer.Argument(help="The job's id (job_...).")]


@jobs_app.command("submit")
@reports_errors
@with_remote()
def jobs_submit(
    spec: Annotated[
        Path,
        typer.Argument(
            help="Spec file (YAML/JSON): a training spec; for --kind evaluate: model, "
            "version and data; for --kind compress: a compress spec whose source is "
            "model:NAME@VERSION.",
            show_default=False,
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="A local table to upload first and use as the spec's data.",
            show_default=False,
        ),
    ] = None,
    kind: Annotated[
        str,
        typer.Option("--kind", help="train, crossval, evaluate or compress.", case_sensitive=False),
    ] = "train",
    folds: Annotated[
        int | None, typer.Option("--folds", "-k", min=2, help="crossval: number of folds (5).")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option("--max-attempts", min=1, help="Runs before it fails.")
    ] = None,
    follow: Annotated[
        bool, flag("--follow", "-f", help="Show progress until the job ends.")
    ] = False,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Queue a job (the server checks the spec first); with --follow, watch it run."""
    from kiln.errors import SpecError
    from kiln.lifecycle import JobKind

    kinds = [k.value for k in JobKind]
    kind = kind.lower()
    if kind not in kinds:
        named = f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        raise SpecError(f"--kind must be {named}, not {kind!r}", field="kind")
    with remote.client() as client:
        job = client.jobs.submit(spec, kind=kind, data=data, folds=folds, max_attempts=max_attempts)
        if not follow:
            if json_out:
                print_json(job)
            else:
                console.print(f"queued {kind} job [bold]{job['id']}[/]")
                console.print(f"follow it with: kiln jobs wait {job['id']}")
            return
        if not json_out:
            err_console.print(f"queued {kind} job {job['id']}", highlight=False)
        code = _follow(client, job["id"], json_out=json_out)
    raise typer.Exit(code)


@jobs_app.command("wait")
@reports_errors
@with_remote()
def jobs_wait(
    job_id: JobArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Follow a job until it ends; the exit code tells how it ended."""
    with remote.client() as client:
        code = _follow(client, job_id, json_out=json_out)
    raise typer.Exit(code)


@jobs_app.command("list")
@reports_errors
@with_remote()
def jobs_list(
    state: Annotated[
        str | None,
        typer.Option(
            "--state", help="queued, running, succeeded, failed or cancelled.", show_default=False
        ),
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Jobs of the project, newest first."""
    with remote.client() as client:
        page = client.jobs.list(state, limit=limit, offset=offset)
    if json_out:
        print_json(page)
        return
    out = table("jobs", "id", "kind", "name", "state", "progress", "attempts", "result", "created")
    for job in page["items"]:
        done, total = _progress(job)
        out.add_row(
            job["id"],
            job["kind"],
            escape(str(job["spec"].get("name", job["spec"].get("model", "")))),
            _state(job["state"]),
            f"{done}/{total}" if total else "",
            f"{job['attempts']}/{job['max_attempts']}",
            escape(_outcome(job)),
            when(job["created_at"]),
        )
    console.print(out)
    page_note(page)


@jobs_app.command("show")
@reports_errors
@with_remote()
def jobs_show(
    job_id: JobArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """A job: state, progress, latest metrics, result or error."""
    from kiln.lifecycle import FINAL_STATES

    with remote.client() as client:
        job = client.jobs.get(job_id)
    if json_out:
        print_json(job)
        return
    console.print(
        f"{job['kind']} job [bold]{job['id']}[/]: {_state(job['state'])}"
        f"{' (cancel requested)' if job['cancel_requested'] else ''}, "
        f"attempt {job['attempts']}/{job['max_attempts']}"
    )
    console.print(
        f"created {when(job['created_at'])}, started {when(job['started_at'])}, "
        f"finished {when(job['finished_at'])}"
        + (f", worker {escape(job['worker'])}" if job["worker"] else "")
    )
    done, total = _progress(job)
    if total:
        console.print(f"progress {done}/{total}  {escape(_status(job))}")
    if job.get("resources"):
        console.print(resources_line(job["resources"]))
        for line in executor_lines(job["resources"]):
            console.print(escape(line), highlight=False, soft_wrap=True)  # one line each
    if job["state"] in FINAL_STATES:
        _print_outcome(job)


@jobs_app.command("logs")
@reports_errors
@with_remote()
def jobs_logs(
    job_id: JobArg,
    follow: Annotated[
        bool, flag("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """The job's log lines (every attempt)."""
    from kiln.lifecycle import FINAL_STATES

    lines: list[JobLogOut] = []
    try:
        with remote.client() as client:
            after = 0
            while True:
                # the state first: lines written before it ended are fetched below
                ended = not follow or client.jobs.get(job_id)["state"] in FINAL_STATES
                new = client.jobs.logs(job_id, after=after)
                for line in new:
                    after = max(after, line["id"])
                    if not json_out:
                        console.print(
                            f"[dim]{when(line['time'])}[/] {_level(line['level'])} "
                            f"[dim]#{line['attempt']}[/] {escape(line['message'])}",
                            highlight=False,
                            soft_wrap=True,
                        )
                lines += new
                if ended:
                    break
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        err_console.print("stopped following the log; the job keeps running")
        raise typer.Exit(130) from None
    if json_out:
        print_json(lines)


@jobs_app.command("metrics")
@reports_errors
@with_remote()
def jobs_metrics(
    job_id: JobArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """The per-epoch series: losses, validation metrics, learning rate, time."""
    with remote.client() as client:
        doc = client.jobs.metrics(job_id)
    if json_out:
        print_json(doc)
        return
    epochs = doc["epochs"]
    keys: list[str] = []
    for row in epochs:
        keys += [k for k in row if k not in keys and k not in ("epoch", "attempt")]
    out = table(f"metrics of {job_id}", "epoch", *keys)
    for row in epochs:
        out.add_row(str(row["epoch"]), *(_cell(row.get(k)) for k in keys))
    console.print(out)


@jobs_app.command("cancel")
@reports_errors
@with_remote()
def jobs_cancel(
    job_id: JobArg,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Cancel a job: a queued one at once, a running one at its next batch."""
    with remote.client() as client:
        job = client.jobs.cancel(job_id)
    if json_out:
        print_json(job)
        return
    if job["state"] == "cancelled":
        console.print(f"cancelled {job['id']}")
    else:
        console.print(f"asked {job['id']} ({job['state']}) to stop; it ends at its next batch")


# --- following ------------------------------------------------------------------


def _follow(client: Client, job_id: str, *, json_out: bool) -> int:
    """Poll the job until it ends (a live progress bar unless --json); its exit code."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_out,
    )
    try:
        with progress:
            task = progress.add_task(job_id, total=None, status="")

            def update(job: JobOut) -> None:
                done, total = _progress(job)
                progress.update(task, completed=done, total=total, status=_status(job))

            job = client.jobs.wait(job_id, poll=POLL_SECONDS, on_update=update)
    except KeyboardInterrupt:
        err_console.print(
            f"stopped following; job {job_id} keeps running on the server "
            f"(kiln jobs wait {job_id} / kiln jobs cancel {job_id})",
            highlight=False,
        )
        return 130
    if json_out:
        print_json(job)
    else:
        _print_outcome(job)
    return exit_code(job)


def resources_line(res: JobResources) -> str:
    """``resources: 12.3 s wall, 11.9 s CPU, peak memory 310.2 MiB on cpu (2 attempts)``."""
    from kiln.monitor.units import amount

    parts = [
        f"{amount('compute_seconds', res.get('wall_seconds', 0.0))} wall",
        f"{amount('compute_seconds', res.get('cpu_seconds', 0.0))} CPU",
        f"peak memory {amount('stored_bytes', res.get('peak_rss_bytes', 0))}",
    ]
    if "gpu_peak_bytes" in res:
        parts.append(f"GPU peak {amount('stored_bytes', res['gpu_peak_bytes'])}")
    attempts = len(res.get("attempts", []))
    tail = f" ({attempts} attempts)" if attempts > 1 else ""
    return f"resources: {', '.join(parts)} on {res.get('device', '?')}{tail}"


def executor_lines(res: JobResources) -> list[str]:
    """Where the latest attempt trained when that was on Ray, then one line per worker::

        ran on Ray ray://head:10001, Ray job 02000000, 2 workers on 2 nodes, 1.5 min worker time
          worker 0: node 10.0.0.5, pid 4242, 2 CPUs, 1 GPU

    Empty for a job that trained in its worker process."""
    from kiln.jobs.placement import node_count
    from kiln.monitor.units import amount, count

    ray = res.get("executor")
    if not ray:
        return []
    workers = ray["workers"]
    head = (
        f"ran on Ray {ray['address']}, Ray job {ray['ray_job_id']}, "
        f"{_plural(len(workers), 'worker')} on {_plural(node_count(ray), 'node')}, "
        f"{amount('worker_seconds', ray['worker_seconds'])} worker time"
    )
    return [head] + [
        f"  worker {w['rank']}: node {w['node_ip']}, pid {w['pid']}, "
        f"{count(w['cpus'])} CPU{'' if w['cpus'] == 1 else 's'}, "
        f"{count(w['gpus'])} GPU{'' if w['gpus'] == 1 else 's'}"
        for w in workers
    ]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def exit_code(job: JobOut) -> int:
    """0 for a succeeded job, its error's exit code if failed, 1 if cancelled."""
    from kiln.errors import ERRORS_BY_CODE, KilnError, TrainingError

    if job["state"] == "succeeded":
        return 0
    if job["state"] == "cancelled":
        return 1
    error = job.get("error")
    code = error["code"] if error else ""
    cls = ERRORS_BY_CODE.get(code, TrainingError)
    return TrainingError.exit_code if cls is KilnError else cls.exit_code


def _print_outcome(job: JobOut) -> None:
    result = job["result"]
    if job["state"] == "failed":
        error = job["error"]
        field = error["field"] if error else None
        message = error["message"] if error else "unknown error"
        where = f" (field: {field})" if field and field not in message else ""
        err_console.print(
            f"[bold red]error:[/] job {job['id']} failed after {job['attempts']} attempt(s): "
            f"{escape(message + where)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    if job["state"] == "cancelled":
        err_console.print(f"job {job['id']} was cancelled", highlight=False)
        return
    if job["kind"] == "compress":
        console.print(f"job {job['id']} succeeded: {escape(_compressed(result))}")
        return
    if job["kind"] == "crossval":
        console.print(
            metrics_table(
                f"{result.get('k')}-fold cross-validation",
                {"mean": result.get("mean", {}), "std": result.get("std", {})},
            )
        )
        return
    version = job.get("model_version") or {
        "model": result.get("model"),
        "version": result.get("version"),
    }
    console.print(
        f"job {job['id']} succeeded: model [bold]{escape(str(version['model']))}[/] "
        f"version [bold]{version['version']}[/]"
    )
    metrics = result.get("metrics", {})
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    if splits:
        console.print(metrics_table("held-out metrics", splits))
    elif metrics:
        console.print(metrics_table("metrics", {"value": metrics}))


def _progress(job: JobOut) -> tuple[int, int | None]:
    """(done, total): epochs of a training job, folds of a cross-validation."""
    p = job.get("progress") or {}
    if "folds" in p:
        return int(p.get("fold", 0)), int(p["folds"])
    if "epochs" in p:
        return int(p.get("epoch", 0)), int(p["epochs"])
    return 0, None


def _status(job: JobOut) -> str:
    """State, latest training loss and validation metric: ``running loss 0.41 val_accuracy 0.9``."""
    m = job.get("metrics") or {}
    parts = [job["state"]]
    if isinstance(m.get("train_loss"), int | float):
        parts.append(f"loss {m['train_loss']:.4f}")
    val = [k for k in m if k.startswith("val_") and k != "val_loss"] or (
        ["val_loss"] if "val_loss" in m else []
    )
    if val and isinstance(m[val[0]], int | float):
        parts.append(f"{val[0]} {m[val[0]]:.4f}")
    return " ".join(parts)


def _compressed(result: JobResult) -> str:
    """``iris v1 -> v2 (01-prune), v3 (02-quantize)``: a compress job's registered variants."""
    variants = ", ".join(f"v{v['version']} ({v['variant']})" for v in result.get("variants", []))
    source = f"{result.get('model', '?')} v{result.get('source_version', '?')}"
    return f"{source} -> {variants}" if variants else f"{source}: no variant registered"


def _outcome(job: JobOut) -> str:
    version, error = job.get("model_version"), job.get("error")
    if version:
        return f"{version['model']} v{version['version']}"
    if job["kind"] == "compress" and job.get("result"):
        return _compressed(job["result"])
    if error:
        return error["code"]
    return ""


STATE_STYLES = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
}


def _state(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{state}[/]"


def _level(level: str) -> str:
    style = {"error": "red", "warning": "yellow"}.get(level, "dim")
    return f"[{style}]{level:<7}[/]"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)

"""``kiln usage`` and ``kiln quotas``: what a project consumed, and the limits on it.

Quantities print in their units: compute (and Ray worker-seconds) in seconds, minutes
or hours, storage in
binary bytes (KiB, MiB, ...), predictions and tokens as counts; ``--by deployment``
and/or ``--by key`` split the rows by deployment and API key; ``--json`` prints the server's
numbers as they are (seconds, bytes, counts). A quota's limit may be given with a
unit: ``2h``, ``90min``, ``500MB``, ``1.5GiB``. Rate limits are quotas of the kinds
``inference`` and ``api`` (``requests_inference``, ``requests_api``), set with
``--rps N`` and/or ``--rpm N``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, Remote, with_remote
from kiln.cli.render import console, print_json, table
from kiln.monitor.units import amount

if TYPE_CHECKING:
    from kiln.client.shapes import QuotaOut

KINDS_HELP = (
    "compute_seconds, worker_seconds (Ray workers × seconds), stored_bytes, "
    "prediction_requests, prediction_rows, tokens "
    "(prompt + completion), prompt_tokens or completion_tokens; for a rate limit, "
    "inference or api (requests_inference, requests_api)"
)
Period = Annotated[
    str,
    typer.Option(
        "--period", help="day or month (UTC calendar), or total; second or minute for rates."
    ),
]
RATE_ALIASES = {"inference": "requests_inference", "api": "requests_api"}
RATE_KINDS = frozenset(RATE_ALIASES.values())

UNITS: dict[str, float] = {
    # seconds
    "s": 1,
    "sec": 1,
    "min": 60,
    "h": 3600,
    "d": 86400,
    # bytes
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_amount(text: str) -> float:
    """``"3600"``, ``"1h"``, ``"90min"``, ``"500MB"``, ``"1.5GiB"`` → seconds or bytes."""
    from kiln.errors import SpecError

    match = _AMOUNT.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in UNITS):
        raise SpecError(
            f"limit: {text!r} is not a number, optionally with a unit "
            "(s, min, h, d; B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
            field="limit",
        )
    return float(match.group(1)) * (UNITS[unit] if unit else 1)


def _per(period: str) -> str:
    return "in total" if period == "total" else f"per {period}"


def _kind(text: str) -> str:
    """A kind as the server names it: ``inference`` and ``api`` are rate limits."""
    return RATE_ALIASES.get(text.lower(), text)


def _quota_line(quota: QuotaOut) -> str:
    kind, limit, used = quota["kind"], quota["limit"], quota["used"]
    if kind in RATE_KINDS:
        return f"rate limit {kind}: {amount(kind, limit)} requests per {quota['period']}"
    share = f" ({100 * used / limit:.0f}%)" if limit else ""
    style = "red" if limit is not None and used >= limit else "green"
    return (
        f"quota {kind} {_per(quota['period'])}: [{style}]{amount(kind, used)}[/] "
        f"of {amount(kind, limit)} used{share}"
    )


@reports_errors
@with_remote()
def usage(
    from_: Annotated[
        str | None,
        typer.Option("--from", help="First day (ISO date or datetime, UTC).", show_default=False),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="End, exclusive (ISO date or datetime).", show_default=False),
    ] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", help="day, month or total.", case_sensitive=False)
    ] = "day",
    by: Annotated[
        list[str] | None,
        typer.Option("--by", help="Also split by deployment and/or key (repeatable)."),
    ] = None,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """What the project used: compute seconds by device, bytes stored, predictions,
    language-model tokens."""
    split = [b.strip().lower() for part in by or [] for b in part.split(",") if b.strip()]
    with remote.client() as client:
        doc = client.usage(from_=from_, to=to, group_by=group_by.lower(), by=split)
    if json_out:
        print_json(doc)
        return
    span = f"from {doc['from'] or 'the start'} to {doc['to'] or 'now'}"
    columns = ["period", "kind", "device", *split, "quantity"]
    out = table(f"usage of {doc['project']} ({span})", *columns)
    for item in doc["items"]:
        groups = {"deployment": item.get("deployment"), "key": item.get("key")}
        out.add_row(
            item["period"],
            item["kind"],
            item["device"] or "",
            *(escape(groups.get(column) or "") for column in split),
            amount(item["kind"], item["quantity"]),
        )
    if doc["items"]:
        console.print(out)
    else:
        console.print(f"no usage recorded for {escape(doc['project'])} ({span})")
    for kind, total in sorted(doc["totals"].items()):
        console.print(f"total {kind}: [bold]{amount(kind, total)}[/]")
    for quota in doc["quotas"]:
        console.print(_quota_line(quota))


quotas_app = typer.Typer(
    help="Per-project limits on usage (set by a global admin key).", no_args_is_help=True
)


@quotas_app.command("set")
@reports_errors
@with_remote()
def quotas_set(
    kind: Annotated[str, typer.Argument(help=KINDS_HELP + ".", show_default=False)],
    limit: Annotated[
        str | None,
        typer.Argument(
            help="The most per period: a number, or with a unit (2h, 90min, 500MB, 1GiB); "
            "not with --rps/--rpm.",
            show_default=False,
        ),
    ] = None,
    period: Period = "day",
    rps: Annotated[
        int | None,
        typer.Option("--rps", min=1, help="Rate limit (KIND inference or api): per second."),
    ] = None,
    rpm: Annotated[
        int | None,
        typer.Option("--rpm", min=1, help="Rate limit (KIND inference or api): per minute."),
    ] = None,
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Cap a project's usage of KIND per period; past it, the server answers 429.

    Rate limits: kiln quotas set inference --rps 20 --project acme (and/or --rpm N; KIND
    api for the management API). They apply at once to requests made with the
    project's keys. --json prints one quota, or a list when both --rps and --rpm are given.
    """
    from kiln.errors import SpecError

    kind = _kind(kind)
    if rps is not None or rpm is not None:
        if kind not in RATE_KINDS:
            raise SpecError("--rps/--rpm: KIND must be inference or api", field="kind")
        if limit is not None:
            raise SpecError("give either LIMIT or --rps/--rpm, not both", field="limit")
        wanted = [(float(n), per) for n, per in ((rps, "second"), (rpm, "minute")) if n]
    elif limit is None:
        raise SpecError(
            "LIMIT is missing (for inference or api: --rps N or --rpm N)", field="limit"
        )
    else:
        wanted = [(parse_amount(limit), period.lower())]
    with remote.client() as client:
        rows = [client.quotas.set(kind, v, period=per, project=remote.project) for v, per in wanted]
    if json_out:
        print_json(rows[0] if len(rows) == 1 else rows)
        return
    for row in rows:
        console.print(
            f"project [bold]{escape(row['project'])}[/]: {kind} limited to "
            f"{amount(kind, row['limit'])} {_per(row['period'])}"
        )
        if kind not in RATE_KINDS:
            console.print(_quota_line(row))


@quotas_app.command("remove")
@reports_errors
@with_remote()
def quotas_remove(
    kind: Annotated[str, typer.Argument(help=KINDS_HELP + ".", show_default=False)],
    period: Period = "day",
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """Remove a project's quota on KIND for a period (a rate limit: --period second or
    minute)."""
    kind = _kind(kind)
    with remote.client() as client:
        row = client.quotas.remove(kind, period=period.lower(), project=remote.project)
    if json_out:
        print_json(row)
        return
    console.print(
        f"project [bold]{escape(row['project'])}[/]: no {kind} quota {_per(row['period'])}"
    )


@quotas_app.command("list")
@reports_errors
@with_remote()
def quotas_list(
    *,
    remote: Remote,
    json_out: JsonOut = False,
) -> None:
    """The project's quotas and what is used of each in its current period."""
    with remote.client() as client:
        rows = client.quotas.list()
    if json_out:
        print_json(rows)
        return
    if not rows:
        console.print("no quotas in this project")
        return
    out = table(f"quotas of {rows[0]['project']}", "kind", "period", "limit", "used", "%")
    for row in rows:
        kind = row["kind"]
        rate = kind in RATE_KINDS  # enforced in memory, nothing metered
        share = f"{100 * row['used'] / row['limit']:.0f}" if row["limit"] and not rate else "-"
        used = "-" if rate else amount(kind, row["used"])
        out.add_row(kind, row["period"], amount(kind, row["limit"]), used, share)
    console.print(out)

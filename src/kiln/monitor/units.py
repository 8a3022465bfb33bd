"""Metered quantities for a person: what the CLI prints and the dashboard shows.

Compute is in seconds, minutes or hours, storage in binary bytes (KiB, MiB, ...),
counts with thousands separators: ``12.3 s``, ``4.5 min``, ``10.0 h``, ``1.2 GiB``,
``1,000,000``. The stored numbers stay seconds, bytes and counts; only the text changes.
"""

from __future__ import annotations

MISSING = "-"
"""The text of a quantity that is not known."""


def duration(seconds: float | None) -> str:
    """``12.3 s`` below two minutes, ``4.5 min`` below two hours, else ``10.0 h``."""
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


def binary_size(size: float | None) -> str:
    """``512 B``, ``316.0 KiB``, ``1.2 GiB`` (powers of 1024, up to TiB)."""
    if size is None:
        return MISSING
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def count(value: float | None) -> str:
    """``1,000,000``; a fractional count keeps two decimals (``2.50``)."""
    if value is None:
        return MISSING
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


DURATION_KINDS = ("compute_seconds", "worker_seconds")
"""Usage kinds metered in seconds: a job's wall seconds; Ray workers × seconds trained."""


def amount(kind: str, value: float | None) -> str:
    """A quantity of usage ``kind`` in its unit: compute_seconds and worker_seconds as a
    duration, stored_bytes as a size, anything else (predictions, rate limits) as a count."""
    if kind in DURATION_KINDS:
        return duration(value)
    if kind == "stored_bytes":
        return binary_size(value)
    return count(value)

"""Read tables: CSV, Parquet and JSON-lines through fsspec, or scikit-learn's bundled sets.

``read_table(source)`` returns a pandas DataFrame; every failure is a DataError or a
NotFoundError that names the source. Nothing here downloads: ``sklearn:<name>``
only serves the datasets that ship inside scikit-learn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from kiln.errors import DataError, NotFoundError

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
SKLEARN_PREFIX = "sklearn:"

_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


def table_format(source: str) -> str:
    """The reader for a source, from its suffix (compression suffixes allowed)."""
    name = source.lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        name = name.removesuffix(comp)
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(
        f"cannot tell the format of {source!r}: expected .csv, .tsv, .parquet or .jsonl",
        field="data.source",
    )


def read_table(source: str, fmt: str | None = None) -> pd.DataFrame:
    """Read ``source`` (path, fsspec URI or ``sklearn:<name>``) into a DataFrame.

    ``fmt`` (csv, tsv, parquet, jsonl) overrides the format the suffix implies.
    """
    if source.startswith(SKLEARN_PREFIX):
        return load_sklearn(source.removeprefix(SKLEARN_PREFIX))
    from kiln.data.parquet import is_dataset_source, read_dataset

    if fmt in (None, "parquet") and is_dataset_source(source):
        # a directory, glob or prefix of Parquet files (hive partitions as columns)
        frame = read_dataset(source)
        if frame.shape[0] == 0:
            raise DataError(f"{source} has no rows", field="data.source")
        return frame
    fmt = fmt or table_format(source)
    import fsspec

    try:
        with fsspec.open(source, mode="rb", compression="infer") as fh:
            frame = _parse(fh, fmt)
    except FileNotFoundError:
        raise NotFoundError(f"data file not found: {source}", field="data.source") from None
    except IsADirectoryError:
        raise DataError(f"{source} is a directory, not a table", field="data.source") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read {source} as {fmt}: {_first_line(exc)}") from None
    if frame.shape[0] == 0:
        raise DataError(f"{source} has no rows", field="data.source")
    frame.columns = [str(c) for c in frame.columns]
    dupes = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if dupes:
        raise DataError(f"{source} has duplicate column names: {dupes}", field="data.source")
    return frame


def _parse(fh: Any, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(fh)
    if fmt == "tsv":
        return pd.read_csv(fh, sep="\t")
    if fmt == "parquet":
        return pd.read_parquet(fh)
    head = fh.read(4096).lstrip()
    fh.seek(0)
    if head.startswith(b"["):
        # A .json file holding one array of records rather than JSON lines.
        return pd.read_json(fh)
    return pd.read_json(fh, lines=True)


def load_sklearn(name: str) -> pd.DataFrame:
    """One of scikit-learn's bundled datasets as a frame; the label column is ``target``.

    Class labels are the dataset's class names (``setosa``), or the digit for digits.
    """
    if name not in SKLEARN_DATASETS:
        raise DataError(
            f"unknown sklearn dataset {name!r}; one of {list(SKLEARN_DATASETS)}",
            field="data.source",
        )
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame: pd.DataFrame = bunch.frame.copy()
    names = getattr(bunch, "target_names", None)
    if names is not None and name != "digits":
        frame["target"] = [str(names[i]) for i in frame["target"]]
    return frame


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a table (column names, dtypes and values), for lineage."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(f"{c}:{t}" for c, t in frame.dtypes.astype(str).items()).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def absolute_source(source: str) -> str:
    """A local path made absolute (so a bundle's lineage still finds it from elsewhere);
    URIs, ``sklearn:`` names and paths that do not exist as given."""
    from pathlib import Path

    if "://" in source or source.startswith("sklearn:") or not Path(source).exists():
        return source
    return str(Path(source).resolve())

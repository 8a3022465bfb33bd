"""The bundle: a directory that is the contract between training and serving.

::

    kiln.json            format, task, architecture spec, input schema, labels,
                         metrics, training history, lineage (spec, data fingerprint,
                         parent), and the SHA-256 of every other file
    weights.safetensors  the model's tensors
    preprocess.json      fitted preprocessing state
    tokenizer/           text models: the tokenizer's JSON files
    booster.txt          gbdt (LightGBM): the model text; booster.json for XGBoost (its JSON)
    model.onnx           optional: the ONNX graph (served by onnxruntime when
                         ``runtime.backend`` says so, e.g. int8 variants)
    compression.json     optional: measurements of a compressed variant

Saving writes into a temporary sibling directory and renames it into place, so a
crash or an error never leaves half a bundle. Loading parses JSON and safetensors
only: it never unpickles or executes anything from the directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from torch import nn

from kiln.data.encoders import numeric_rows
from kiln.data.preprocess import Preprocessor
from kiln.data.preprocess_state import JSONScalar
from kiln.errors import BundleError, ConflictError, DataError, NotFoundError
from kiln.evaluate.metrics import Metrics
from kiln.manifest import FORMAT, BundleMeta, JSONDocument, parse_manifest
from kiln.models.gbdt import GBDTModel
from kiln.models.registry import build
from kiln.runtime import Backend
from kiln.runtime.placement import half_dtype
from kiln.runtime.select import recorded_backend

META_FILE = "kiln.json"
WEIGHTS_FILE = "weights.safetensors"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
ONNX_FILE = "model.onnx"
REPORT_FILE = "compression.json"


class PredictionsDocument(TypedDict, total=False):
    """:class:`Predictions` as JSON: ``probabilities`` and ``labels`` for classes only."""

    predictions: list[JSONScalar]
    probabilities: list[list[float]]
    labels: list[JSONScalar] | None


@dataclass
class Predictions:
    """Predictions for a batch of rows.

    ``predictions`` holds a label (classification) or a number (regression) per row;
    ``probabilities`` one list per row ordered like ``labels``.
    """

    predictions: list[JSONScalar]
    probabilities: list[list[float]] | None
    labels: list[JSONScalar] | None

    def to_dict(self) -> PredictionsDocument:
        out: PredictionsDocument = {"predictions": self.predictions}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities
            out["labels"] = self.labels
        return out


class Bundle:
    """A trained model with its preprocessing and metadata; save, load, predict, evaluate."""

    def __init__(
        self,
        meta: BundleMeta,
        model: nn.Module,
        preprocessor: Preprocessor,
        *,
        onnx: bytes | None = None,
        report: JSONDocument | None = None,
    ) -> None:
        self.meta = meta
        self.model = model.eval()
        self.preprocessor = preprocessor
        self.onnx = onnx
        self.report = report
        self.path: Path | None = None
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        """The inference backend the manifest's ``runtime`` names (created on first use;
        see ``kiln.runtime.select``)."""
        if self._backend is None:
            self._backend = recorded_backend(self.model, self.meta.runtime, self.onnx)
        return self._backend

    # ---- use -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def metrics(self) -> dict[str, Metrics]:
        """Per held-out split (``test``, ``val``): the metrics measured at training."""
        return self.meta.metrics

    def predict(self, rows: Any) -> Predictions:
        """Predict for rows: a DataFrame, a list of dicts, or an array (N, features).

        Columns are matched by name (extra columns, e.g. the target, are ignored);
        bad values raise a DataError naming the column and the row.
        """
        from kiln.evaluate.scoring import decode

        decoded = decode(self.preprocessor, self.backend.forward(self._encode(rows)))
        proba = decoded.probabilities
        return Predictions(
            predictions=decoded.predictions,
            probabilities=proba.tolist() if proba is not None else None,
            labels=decoded.labels,
        )

    def evaluate(
        self, data: pd.DataFrame | str | Path, *, data_root: Path | None = None
    ) -> Metrics:
        """Metrics on labelled data (a DataFrame or a table path/URI holding the target).

        Rows whose target is empty are skipped and counted in ``rows_skipped``.
        ``data_root`` (a server's dataset folder) confines image paths to it.
        """
        from kiln.evaluate.scoring import score

        frame = (
            data if isinstance(data, pd.DataFrame) else self.read(str(data), data_root=data_root)
        )
        target = self.meta.target
        if target not in frame.columns:
            raise DataError(f"target column {target!r} is not in the data", field=target)
        present = frame[target].notna()
        frame = frame[present].reset_index(drop=True)
        if frame.empty:
            raise DataError(f"target column {target!r} has no values", field=target)
        outputs = self._forward(frame)
        y = self.preprocessor.transform_target(frame[target])
        metrics = score(self.preprocessor, outputs, y)
        metrics["rows"] = len(frame)
        metrics["rows_skipped"] = int((~present).sum())
        return metrics

    def example_input(self) -> torch.Tensor:
        """One all-zero (or, for text, eight-token) input row, shaped like real input."""
        shape = self.preprocessor.input_shape
        if self.preprocessor.kind == "text":
            return torch.ones(1, 2, 8, dtype=torch.long)
        return torch.zeros(1, *shape)

    def read(self, source: str, *, data_root: Path | None = None) -> pd.DataFrame:
        """Read input rows from a table (csv/parquet/jsonl) or, for image models, a folder.

        Image paths in a table are taken relative to the table's folder. A folder with
        one sub-folder per class gives labelled rows; any other folder, its images.
        With ``data_root`` (a server's dataset folder) they must name files inside it.
        """
        from kiln.data.images import FOLDER_IMAGE_COLUMN, folder_table, list_images, resolve_paths
        from kiln.data.sources import read_table

        image = self.preprocessor.state.image
        if image is not None and Path(source).is_dir():
            root = Path(source)
            if any(p.is_dir() for p in root.iterdir()):
                frame = folder_table(root, self.meta.target, within=data_root)
            else:
                frame = list_images(root, within=data_root)
            return frame.rename(columns={FOLDER_IMAGE_COLUMN: image.column})
        frame = read_table(source)
        if image is not None and "://" not in source:
            frame = resolve_paths(frame, image.column, Path(source).parent, root=data_root)
        return frame

    def _encode(self, rows: Any) -> np.ndarray:
        """The model's input for ``rows``: plain numbers for an all-numeric model go
        straight to the preprocessor's batch encoding (no DataFrame); anything else, or
        anything it doubts, through the table."""
        names = self.preprocessor.numeric_columns
        matrix = _numeric_matrix(rows, names) if names is not None else None
        if matrix is not None:
            return self.preprocessor.transform_matrix(matrix)
        return self.preprocessor.transform(self._frame(rows))

    def _frame(self, rows: Any) -> pd.DataFrame:
        names = self.preprocessor.feature_names
        if isinstance(rows, pd.DataFrame):
            return rows
        if isinstance(rows, np.ndarray | torch.Tensor) or (
            isinstance(rows, list) and rows and isinstance(rows[0], list | tuple)
        ):
            arr = np.asarray(rows, dtype=object)
            if arr.ndim != 2 or arr.shape[1] != len(names):
                raise DataError(
                    f"expected rows of {len(names)} features ({', '.join(names[:5])}"
                    f"{', ...' if len(names) > 5 else ''}), got shape {list(arr.shape)}",
                    field="inputs",
                )
            return pd.DataFrame(arr, columns=names)
        if isinstance(rows, dict):
            rows = [rows]
        if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
            return pd.DataFrame.from_records(rows)
        raise DataError("rows must be a DataFrame, a list of dicts or a 2-D array", field="inputs")

    def _forward(self, frame: pd.DataFrame) -> torch.Tensor:
        return torch.from_numpy(self.backend.forward(self.preprocessor.transform(frame)))

    # ---- persistence -----------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the bundle to ``directory`` atomically; replaces an older bundle there.

        A directory that exists but is not a bundle is never overwritten.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        check_destination(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            half = half_dtype(self.meta.runtime.quantization)
            state = {
                k: (v.to(half) if half is not None and v.is_floating_point() else v)
                .detach()
                .cpu()
                .contiguous()
                for k, v in self.model.state_dict().items()
            }
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            if isinstance(self.model, GBDTModel):  # trees: the library's own format
                (tmp / self.model.booster_file).write_bytes(self.model.booster_bytes())
            write_json(tmp / PREPROCESS_FILE, self.preprocessor.to_json())
            if self.preprocessor.tokenizer is not None:
                self.preprocessor.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            if self.onnx is not None:
                (tmp / ONNX_FILE).write_bytes(self.onnx)
            if self.report is not None:
                write_json(tmp / REPORT_FILE, self.report)
            self.meta.files = {
                p.relative_to(tmp).as_posix(): sha256_file(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            write_json(tmp / META_FILE, self.meta.model_dump(mode="json"))
            default_permissions(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = out
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Bundle:
        """Read a bundle directory; verifies file hashes and the weights' shapes."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory)
        if not path.is_dir():
            raise NotFoundError(f"bundle directory not found: {path}", field="bundle")
        meta = parse_manifest(read_json(path / META_FILE), str(path / META_FILE))
        model_spec = meta.model
        verify_files(path, meta, required=(WEIGHTS_FILE, PREPROCESS_FILE))
        try:
            pre = Preprocessor.from_json(read_json(path / PREPROCESS_FILE))
        except ValidationError as exc:
            raise BundleError(f"{path / PREPROCESS_FILE} is invalid: {exc}") from None
        if pre.state.text is not None:
            from kiln.data.text import load_tokenizer

            unlisted = [
                p.relative_to(path).as_posix()
                for p in (path / TOKENIZER_DIR).rglob("*")
                if p.is_file() and p.relative_to(path).as_posix() not in meta.files
            ]
            listed = [f for f in meta.files if f.startswith(f"{TOKENIZER_DIR}/")]
            if unlisted or not listed:
                raise BundleError(
                    f"bundle {path}: tokenizer files not covered by {META_FILE}: "
                    f"{unlisted or [TOKENIZER_DIR]}"
                )
            pre.tokenizer = load_tokenizer(path / TOKENIZER_DIR, for_bundle=True)
        _check_consistent(path, meta, pre, model_spec)
        try:
            model = build(model_spec, meta.n_inputs, meta.n_outputs, **meta.model_context)
        except Exception as exc:  # a manifest that describes no buildable model
            raise BundleError(f"{path / META_FILE} describes no valid model: {exc}") from None
        try:
            state = load_file(str(path / WEIGHTS_FILE))
            model.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError) as exc:
            raise BundleError(f"{path / WEIGHTS_FILE} does not fit the model: {exc}") from None
        if isinstance(model, GBDTModel):
            if model.booster_file not in meta.files:
                raise BundleError(f"bundle {path}: {META_FILE} lists no {model.booster_file}")
            model.load_booster((path / model.booster_file).read_bytes())
        onnx = (path / ONNX_FILE).read_bytes() if ONNX_FILE in meta.files else None
        report = read_json(path / REPORT_FILE) if REPORT_FILE in meta.files else None
        bundle = cls(meta, model, pre, onnx=onnx, report=report)
        bundle.path = path
        return bundle


def verify_files(path: Path, meta: BundleMeta, *, required: Iterable[str] = ()) -> None:
    """Every file ``meta`` lists, and every ``required`` one, lies inside the bundle at
    ``path``, is there, and matches its SHA-256 in the manifest (a BundleError if not)."""
    for name in {*required, *meta.files}:
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"{path / META_FILE} lists a path outside the bundle: {name}")
        if not file.is_file():
            raise BundleError(f"bundle {path} is missing {name}")
        expected = meta.files.get(name)
        if expected is None or sha256_file(file) != expected:
            raise BundleError(f"{file} does not match its checksum in {META_FILE}")


def _check_consistent(path: Path, meta: BundleMeta, pre: Preprocessor, model_spec: Any) -> None:
    """The manifest, the preprocessing and the architecture must describe one model."""
    if pre.n_outputs != meta.n_inputs:
        raise BundleError(
            f"bundle {path}: preprocessing gives {pre.n_outputs} inputs, the manifest "
            f"says {meta.n_inputs}"
        )
    labels = pre.labels
    if (len(labels) if labels is not None else 1) != meta.n_outputs:
        raise BundleError(f"bundle {path}: the labels do not match the model's outputs")
    if model_spec.type == "pretrained" and "hf_config" not in meta.model_context:
        # Without its config the builder would load from model.path: outside the bundle.
        raise BundleError(f"bundle {path}: a pretrained model's config is missing")


def _numeric_matrix(rows: Any, names: list[str]) -> np.ndarray | None:
    """``rows`` (a dict, a list of dicts, a 2-D array or list of lists) as a float64
    (N, len(names)) array when they hold plain numbers for every column; else None."""
    if isinstance(rows, dict):
        rows = [rows]
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    if isinstance(rows, np.ndarray):
        plain = rows.ndim == 2 and rows.shape[1] == len(names) and rows.dtype.kind in "iuf"
        return rows.astype(np.float64) if plain else None
    if not isinstance(rows, list) or not rows:
        return None
    if isinstance(rows[0], dict):
        return numeric_rows(rows, names)
    if all(isinstance(r, list | tuple) and len(r) == len(names) for r in rows):
        return numeric_rows(rows, range(len(names)))
    return None


def check_destination(out: Path, *, name: str | None = None, force: bool = False) -> str | None:
    """Refuse a destination that holds something other than a bundle (or nothing).

    With ``name`` (the model about to be saved there), a bundle of another model (or
    one whose manifest names none) is refused too, a ConflictError naming both, unless
    ``force``. Returns the model name of the bundle ``out`` holds: ``""`` when its
    manifest names none, None when ``out`` holds no bundle.
    """
    is_foreign = out.exists() and not (out / META_FILE).is_file()
    if is_foreign and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(
            f"{out} exists and is not a kiln bundle; refusing to overwrite it", field="out"
        )
    if is_foreign or not out.exists():
        return None
    held = _manifest_name(out / META_FILE)
    if name is not None and held != name and not force:
        what = f"model {held!r}" if held else "a model it does not name"
        raise ConflictError(
            f"{out} holds a bundle of {what}; refusing to replace it with model {name!r} "
            "(--force replaces it)",
            field="out",
        )
    return held or ""


def _manifest_name(path: Path) -> str | None:
    """The model name a ``kiln.json`` records; None when it cannot be read."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def new_meta(**fields: Any) -> BundleMeta:
    """A manifest stamped with the current time and kiln version."""
    from kiln import __version__

    return BundleMeta(
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        kiln_version=__version__,
        **fields,
    )


def default_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories (and safetensors 0600 files); give the bundle the
    permissions any directory the user creates would have (per the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for p in directory.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON (no NaN or infinity: they are not JSON)."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; BundleError naming the file when it is missing
    or not valid JSON."""
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing bundle there is swapped out, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)

"""Serving gradient-boosted trees: the booster's own predictor, or onnxruntime on an
onnxmltools export, whichever is faster here.

:class:`TreeBackend` runs :meth:`GBDTModel.predict_raw` on numpy (no torch on the hot
path). :func:`export_trees` converts the booster to ONNX and shapes the graph like
every kiln ``model.onnx``: one input ``input`` (N, F) float, one output ``output``
(N, O) raw outputs. For classification those are the log of the trees' probabilities
(a valid logit vector: its softmax is the probability the booster gives; not the
booster's own margins, which differ by a constant per row); for regression, the
value. :func:`check_tree_parity` compares the two in that decoded space (softmax
probabilities, or values relative to their scale), and :func:`choose_tree_backend`
measures 1-row latency and a 256-row batch for each and keeps the faster.

Inputs are the native encoding: numbers unscaled with NaN for missing, categories as
float codes with NaN for missing or unseen; :func:`tree_samples` makes such rows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kiln.data.preprocess_state import CategoricalFeature, NumericFeature
from kiln.errors import ExportError
from kiln.models.gbdt import GBDTModel
from kiln.runtime import Backend
from kiln.runtime.onnx import PARITY_TOLERANCE, OnnxBackend
from kiln.runtime.select import Selection

if TYPE_CHECKING:
    from onnx import ModelProto

# ai.onnx opset asked of onnxmltools (its tree converters emit ai.onnx.ml operators)
TARGET_OPSET = 15
# log(p) of a probability rounded to 0 would be -inf; softmax of the floor is 0 too
PROBABILITY_FLOOR = 1e-30
# the batch sizes the choice is measured on, and the runs per size (median kept)
CHOICE_BATCHES = (1, 256)
CHOICE_RUNS = 7


class TreeBackend:
    """The booster's own predictor: ``forward`` maps native features (N, F) to kiln
    raw outputs (N, O) float32 (see :class:`~kiln.models.gbdt.GBDTModel`)."""

    def __init__(self, model: GBDTModel) -> None:
        self.model = model
        self.name: str = model.library

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_raw(x)


# ---- export ----------------------------------------------------------------------


def export_trees(model: GBDTModel) -> bytes:
    """The booster as a kiln-shaped ONNX graph (see the module docstring).

    Raises ExportError when onnxmltools cannot convert it; the result is not yet
    checked against the booster (:func:`check_tree_parity` does that).
    """
    if model.booster is None:
        raise ExportError("the gbdt model has no booster to export")
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    inputs = [("input", FloatTensorType([None, model.n_inputs]))]
    proto: ModelProto
    try:
        if model.library == "lightgbm":
            proto = onnxmltools.convert_lightgbm(
                model.booster, initial_types=inputs, target_opset=TARGET_OPSET, zipmap=False
            )
        else:
            proto = onnxmltools.convert_xgboost(
                model.booster, initial_types=inputs, target_opset=TARGET_OPSET
            )
    except Exception as exc:  # the converters raise whatever they meet
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ExportError(
            f"onnxmltools cannot convert this {model.library} booster ({first}); "
            "it is served by the booster's own predictor"
        ) from None
    shaped = kiln_shaped(proto, classification=model.task == "classification")
    return bytes(shaped.SerializeToString())


def kiln_shaped(proto: ModelProto, *, classification: bool) -> ModelProto:
    """``proto`` (an onnxmltools tree graph) with one output ``output``: log of the
    ``probabilities`` (floored) for a classifier, the ``variable`` for a regressor."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    names = [o.name for o in graph.output]
    source = "probabilities" if classification else "variable"
    if source not in names:
        raise ExportError(f"the tree export has outputs {names}, not {source!r}")
    for node in graph.node:  # the LightGBM regressor names its ensemble's value "output"
        node.input[:] = ["kiln_trees_output" if n == "output" else n for n in node.input]
        node.output[:] = ["kiln_trees_output" if n == "output" else n for n in node.output]
    if classification:
        floor = numpy_helper.from_array(np.array(PROBABILITY_FLOOR, np.float32), "kiln_floor")
        graph.initializer.append(floor)
        graph.node.extend(
            [
                helper.make_node("Max", [source, "kiln_floor"], ["kiln_floored"]),
                helper.make_node("Log", ["kiln_floored"], ["output"]),
            ]
        )
    else:
        graph.node.append(helper.make_node("Identity", [source], ["output"]))
    del graph.output[:]  # the classifier's label output goes: kiln decodes labels itself
    graph.output.append(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", None]))
    return proto


# ---- parity ----------------------------------------------------------------------


def check_tree_parity(model: GBDTModel, onnx_model: bytes, samples: np.ndarray) -> float:
    """Max difference between the booster and onnxruntime on ``samples`` (native rows:
    include NaN and category codes): of probabilities for classification, of values
    relative to their scale for regression. ExportError past PARITY_TOLERANCE."""
    expected = model.predict_raw(samples)
    try:
        got = OnnxBackend(onnx_model, threads=1).forward(np.ascontiguousarray(samples, np.float32))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(
            f"the tree export does not run in onnxruntime ({str(exc).splitlines()[0][:160]})"
        ) from None
    if got.shape != expected.shape:
        raise ExportError(
            f"the tree export gives outputs of shape {list(got.shape)} where the booster "
            f"gives {list(expected.shape)}"
        )
    if model.task == "classification":
        diff = float(np.abs(_softmax(expected) - _softmax(got)).max())
    else:
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(expected - got).max()) / scale
    if not diff <= PARITY_TOLERANCE:  # NaN disagrees too
        raise ExportError(
            f"the {model.library} tree export disagrees with the booster (max diff "
            f"{diff:.2e} on rows with missing values and category codes); it is served "
            "by the booster's own predictor"
        )
    return diff


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def tree_samples(
    features: Sequence[NumericFeature | CategoricalFeature], rows: int = 64, seed: int = 0
) -> np.ndarray:
    """Native rows (N, F) float32 for parity checks: numbers around each column's
    fitted centre and scale, category codes of each column's categories, and about a
    fifth of every column missing (NaN: what a missing or unseen category becomes)."""
    rng = np.random.default_rng(seed)
    columns = []
    for feature in features:
        if isinstance(feature, CategoricalFeature):
            column = rng.integers(0, max(1, len(feature.categories)), rows).astype(np.float32)
        else:
            column = (feature.center + feature.scale * rng.standard_normal(rows)).astype(np.float32)
        column[rng.random(rows) < 0.2] = np.nan
        columns.append(column)
    x = np.stack(columns, axis=1) if columns else np.zeros((rows, 0), np.float32)
    x[0] = np.nan  # a row with every value missing
    return x


# ---- the measured choice -----------------------------------------------------------


def choose_tree_backend(
    model: GBDTModel, samples: np.ndarray, *, threads: int | None = None
) -> Selection:
    """The faster of the booster's predictor and onnxruntime on a parity-checked
    export (see :func:`check_tree_parity`; ``samples`` are native rows).

    Each is timed as the median of CHOICE_RUNS calls at 1 row and at 256 rows (cycled
    from ``samples``); onnxruntime is chosen when the product of its two time ratios
    to the booster's is below 1 (latency and throughput weigh alike). The selection
    records the parity (None when there was no usable export) and the timings, in
    seconds by batch size, under each backend's name. The booster's predictor serves
    when the export fails or disagrees.
    """
    native = TreeBackend(model)
    batches = {size: _rows(samples, size) for size in CHOICE_BATCHES}
    timings = {native.name: _time(native, batches)}
    try:
        graph = export_trees(model)
        parity = check_tree_parity(model, graph, samples)
    except ExportError:
        return Selection(native, None, timings)
    ort = OnnxBackend(graph, threads=threads or model.threads, spinning=False)
    timings[ort.name] = _time(ort, batches)
    ratio = float(np.prod([timings[ort.name][b] / timings[native.name][b] for b in batches]))
    return Selection(ort if ratio < 1.0 else native, parity, timings)


def _rows(samples: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows cycled from ``samples``, contiguous float32."""
    index = np.arange(size) % len(samples)
    return np.ascontiguousarray(samples[index], dtype=np.float32)


def _time(backend: Backend, batches: dict[int, np.ndarray]) -> dict[int, float]:
    """Median seconds of CHOICE_RUNS calls per batch, after one warm-up call."""
    out: dict[int, float] = {}
    for size, batch in batches.items():
        backend.forward(batch)
        runs = []
        for _ in range(CHOICE_RUNS):
            started = time.perf_counter()
            backend.forward(batch)
            runs.append(time.perf_counter() - started)
        out[size] = statistics.median(runs)
    return out

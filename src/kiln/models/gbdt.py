"""Gradient-boosted trees as a kiln model: a LightGBM or XGBoost booster behind the
``nn.Module`` interface every other model has.

The module has no parameters: ``forward`` hands the batch to the booster's own
predictor and returns raw outputs in kiln's convention, so scoring, serving, batching
and distillation treat it like any model. Classification gives logits (binary:
``[0, margin]``, whose softmax is the booster's probability; multiclass: one margin
per class); regression gives the prediction in the preprocessor's scaled target
units. The booster is saved in the library's own format (LightGBM model text,
XGBoost JSON), which parses without executing or unpickling anything; its structure
is checked in Python before the library sees it (:mod:`kiln.models.booster_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kiln.errors import BundleError
from kiln.models.booster_check import check_booster
from kiln.models.registry import register
from kiln.spec.model import GBDTSpec

Library = Literal["lightgbm", "xgboost"]
BOOSTER_FILES: dict[str, str] = {"lightgbm": "booster.txt", "xgboost": "booster.json"}


@dataclass(frozen=True)
class TreeSummary:
    """What a trained booster holds: trees (one per class per round for multiclass),
    their leaves, and each input column's total split gain, largest first."""

    library: str
    rounds: int
    trees: int
    leaves: int
    importance: list[tuple[str, float]]


class GBDTModel(nn.Module):
    """A booster with kiln's input and output conventions (see the module docstring).

    ``categorical`` are the input columns holding category codes (native splits);
    ``feature_names`` name the input columns for importances.
    """

    def __init__(
        self,
        spec: GBDTSpec,
        n_inputs: int,
        n_outputs: int,
        *,
        task: str,
        categorical: list[int] | None = None,
        feature_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.library: Library = spec.library
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        self.task = task
        self.categorical = list(categorical or [])
        self.feature_names = list(feature_names or [f"x{i}" for i in range(n_inputs)])
        # a bundle's model_context says these: an inconsistent one is refused here, not
        # met later as an IndexError (summary) or a wrong decoding
        if task not in ("classification", "regression"):
            raise BundleError(f"gbdt task {task!r}", field="model_context.task")
        if len(self.feature_names) != n_inputs:
            raise BundleError(
                f"{len(self.feature_names)} feature names for {n_inputs} inputs",
                field="model_context.feature_names",
            )
        if not all(isinstance(i, int) and 0 <= i < n_inputs for i in self.categorical):
            raise BundleError(
                f"categorical columns {self.categorical} not all of 0..{n_inputs - 1}",
                field="model_context.categorical",
            )
        self.booster: Any = None
        self.threads = spec.threads or torch.get_num_threads()

    @property
    def booster_file(self) -> str:
        """The bundle file the booster is saved to."""
        return BOOSTER_FILES[self.library]

    # ---- prediction ----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs (N, O) float32 for features (N, F); NaN is a missing value."""
        raw = self.predict_raw(x.detach().cpu().numpy())
        return torch.from_numpy(raw)

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        """The booster's margins for (N, F) features, as kiln's raw outputs (N, O)."""
        if self.booster is None:
            raise BundleError("the gbdt model has no booster (not trained or loaded)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.library == "lightgbm":
            margins = self.booster.predict(x, raw_score=True, num_threads=self.threads)
        else:
            margins = self.booster.inplace_predict(x, predict_type="margin")
        return as_outputs(np.asarray(margins, dtype=np.float32), self.n_outputs)

    # ---- persistence ---------------------------------------------------------------

    def booster_bytes(self) -> bytes:
        """The booster in the library's own format (see :attr:`booster_file`)."""
        if self.booster is None:
            raise BundleError("the gbdt model has no booster to save")
        if self.library == "lightgbm":
            return str(self.booster.model_to_string()).encode("utf-8")
        return bytes(self.booster.save_raw(raw_format="json"))

    def load_booster(self, data: bytes) -> None:
        """Parse a booster saved by :meth:`booster_bytes` (text/JSON: no code runs).
        Its structure is checked first (booster_check): the native parsers trust it."""
        check_booster(self.library, data, self._trees_per_round(), self.booster_file)
        try:
            self.booster = parse_booster(self.library, data)
        except Exception as exc:  # each library raises its own error type
            raise BundleError(
                f"{self.booster_file} is not a valid {self.library} model: {exc}"
            ) from None
        self._configure()
        trees_inputs = self.booster_inputs()
        if trees_inputs != self.n_inputs:
            raise BundleError(
                f"{self.booster_file} takes {trees_inputs} inputs, the manifest says "
                f"{self.n_inputs}"
            )
        # A booster with other outputs than the manifest's labels would mis-decode (or,
        # with a huge class count, stall predict allocating its outputs).
        try:
            per_round = self.booster_trees_per_round()
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.booster_file}: no class count ({exc})") from None
        if per_round != self._trees_per_round():
            raise BundleError(
                f"{self.booster_file} grows {per_round} trees per round, the manifest's "
                f"{self.task} with {self.n_outputs} outputs needs {self._trees_per_round()}"
            )

    def booster_trees_per_round(self) -> int:
        """Trees per boosting round of the booster (its class count for multiclass)."""
        if self.library == "lightgbm":
            return int(self.booster.num_model_per_iteration())
        import json

        config = json.loads(self.booster.save_config())
        return max(1, int(config["learner"]["learner_model_param"]["num_class"]))

    def booster_inputs(self) -> int:
        """How many input columns the booster was trained on."""
        if self.library == "lightgbm":
            return int(self.booster.num_feature())
        return int(self.booster.num_features())

    def _configure(self) -> None:
        if self.library == "xgboost":
            self.booster.set_param({"nthread": self.threads})

    # ---- description ---------------------------------------------------------------

    def summary(self) -> TreeSummary:
        """Trees, leaves and per-column gain of the booster."""
        if self.booster is None:
            raise BundleError("the gbdt model has no booster")
        if self.library == "lightgbm":
            tree_info = self.booster.dump_model()["tree_info"]
            trees, leaves = len(tree_info), sum(int(t["num_leaves"]) for t in tree_info)
            gains = self.booster.feature_importance(importance_type="gain")
            by_column = {self.feature_names[i]: float(g) for i, g in enumerate(gains)}
        else:
            frame = self.booster.trees_to_dataframe()
            trees, leaves = int(frame["Tree"].nunique()), int((frame["Feature"] == "Leaf").sum())
            by_column = dict.fromkeys(self.feature_names, 0.0)
            for key, gain in self.booster.get_score(importance_type="total_gain").items():
                by_column[self.feature_names[int(str(key).removeprefix("f"))]] = float(gain)
        ranked = sorted(by_column.items(), key=lambda kv: -kv[1])
        rounds = trees // self._trees_per_round()
        return TreeSummary(self.library, rounds, trees, leaves, ranked)

    def _trees_per_round(self) -> int:
        return self.n_outputs if self.task == "classification" and self.n_outputs > 2 else 1


def as_outputs(margins: np.ndarray, n_outputs: int) -> np.ndarray:
    """Booster margins ((N,) or (N, K)) as kiln raw outputs (N, O): binary
    classification gets a zero logit for the first class."""
    if margins.ndim == 1:
        margins = margins[:, None]
    if n_outputs == 2 and margins.shape[1] == 1:
        return np.concatenate([np.zeros_like(margins), margins], axis=1)
    return margins


def parse_booster(library: str, data: bytes) -> Any:
    """A booster from its saved bytes (LightGBM model text or XGBoost JSON)."""
    if library == "lightgbm":
        import lightgbm as lgb

        return lgb.Booster(model_str=data.decode("utf-8"))
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(data))
    return booster


@register("gbdt")
def build_gbdt(spec: GBDTSpec, n_inputs: int, n_outputs: int, **context: Any) -> GBDTModel:
    """An untrained booster wrapper; ``context`` holds ``task``, ``categorical`` and
    ``feature_names`` (the bundle's ``model_context``)."""
    return GBDTModel(
        spec,
        n_inputs,
        n_outputs,
        task=str(context.get("task", "classification")),
        categorical=list(context.get("categorical", [])),
        feature_names=context.get("feature_names"),
    )

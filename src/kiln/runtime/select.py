"""Which backend runs a bundle's model, on which device, at which precision.

The one place that turns a bundle's runtime record (``kiln.json`` ``runtime``) into a
:class:`~kiln.runtime.Backend`:

- ``torch`` with no quantization: the fp32 model, eager, on the CPU;
- ``torch`` + ``int8_dynamic``: the fp32 weights quantized again at load (CPU);
- ``torch`` + ``fp16``/``bf16``: half weights on CUDA (refused without a GPU);
- ``onnxruntime``: the bundle's ``model.onnx``;
- a gbdt model's ``torch`` record: the booster's own predictor (``kiln.runtime.trees``).

The library runs what the record names (:func:`recorded_backend`); a server may instead
serve an fp32 model through a fresh ONNX export when it agrees with torch
(:func:`select_backend`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from kiln.errors import BundleError, ExportError, SpecError
from kiln.runtime import Backend, ServingChoice
from kiln.runtime.eager import TorchBackend
from kiln.runtime.placement import Placement, cuda_available, half_dtype

if TYPE_CHECKING:
    from kiln.runtime.generation import Generator


class RuntimeRecord(Protocol):
    """What the runtime reads of ``kiln.manifest.Runtime`` (a bundle's ``runtime``)."""

    @property
    def backend(self) -> str: ...

    @property
    def quantization(self) -> str | None: ...


@dataclass(frozen=True)
class Selection:
    """The backend chosen, and the torch/onnxruntime parity of an ONNX export made for
    it (max relative difference; None when no export was made). ``timings``: for a
    choice made by measurement (gbdt), median seconds per call by batch size under
    each backend's name."""

    backend: Backend
    parity: float | None = None
    timings: Mapping[str, Mapping[int, float]] | None = None


def runtime_model(model: nn.Module, runtime: RuntimeRecord) -> nn.Module:
    """The module the torch backend runs for ``runtime``: the fp32 ``model`` itself, its
    int8 quantization, or a copy with half weights on CUDA. ``model`` is never changed."""
    if runtime.quantization == "int8_dynamic":
        from kiln.runtime.quantized import torch_int8

        return torch_int8(model)
    placement = Placement.for_variant(runtime.quantization)
    if placement.weights is not None:
        return placement.place(copy.deepcopy(model))
    return model


def torch_backend(model: nn.Module, runtime: RuntimeRecord) -> TorchBackend:
    """Eager torch for ``runtime`` (see :func:`runtime_model`)."""
    int8 = runtime.quantization == "int8_dynamic"
    return TorchBackend(
        runtime_model(model, runtime), half_dtype(runtime.quantization), fastpath=not int8
    )


def recorded_backend(
    model: nn.Module,
    runtime: RuntimeRecord,
    onnx: bytes | None = None,
    *,
    threads: int | None = None,
    spinning: bool = True,
) -> Backend:
    """The backend the runtime record names: torch (see :func:`runtime_model`) or
    onnxruntime on ``onnx`` (the bundle's ``model.onnx``; BundleError without one).

    ``threads`` and ``spinning`` configure onnxruntime's intra-op pool (see
    :class:`~kiln.runtime.onnx.OnnxBackend`).
    """
    if runtime.backend == "onnxruntime":
        from kiln.runtime.onnx import OnnxBackend

        if onnx is None:
            raise BundleError("runtime.backend is onnxruntime but there is no model.onnx")
        return OnnxBackend(onnx, threads, spinning=spinning)
    from kiln.models.gbdt import GBDTModel

    if isinstance(model, GBDTModel):  # trees run on their own library, never torch
        from kiln.runtime.trees import TreeBackend

        return TreeBackend(model)
    return torch_backend(model, runtime)


def select_backend(
    model: nn.Module,
    runtime: RuntimeRecord,
    choice: ServingChoice,
    *,
    onnx: bytes | None,
    example: torch.Tensor,
    samples: np.ndarray,
) -> Selection:
    """The backend a server runs, whose onnxruntime threads sleep between batches.

    An onnxruntime variant runs its ``model.onnx`` (SpecError, field ``backend``, for
    ``torch``); a quantized torch variant runs on torch whatever ``choice`` says. An
    fp32 model runs on torch for ``torch`` (and for ``auto`` on CUDA); otherwise it is
    exported (traced on ``example``) and served by onnxruntime if it agrees with torch
    on ``samples``. A failed export falls back to torch for ``auto``, and is a SpecError
    naming ``backend`` for ``onnx``. A gbdt model has no torch runtime: ``torch``
    means its own (the booster's predictor) and ``auto`` the faster of that and an
    onnxmltools export, measured on ``samples`` (native rows; see
    :func:`kiln.runtime.trees.choose_tree_backend`).
    """
    # Between batches onnxruntime's threads would spin, busy-waiting for the next run
    # on cores the event loop needs (and slowing torch's softmax after each run from
    # microseconds to milliseconds on a 2-core machine): no spinning here.
    if runtime.backend == "onnxruntime":  # an int8 variant: ONNX is the model
        if choice == "torch":
            raise SpecError(
                "this version is an onnxruntime variant; it has no torch backend",
                field="backend",
            )
        return Selection(recorded_backend(model, runtime, onnx, spinning=False))
    from kiln.models.gbdt import GBDTModel

    if isinstance(model, GBDTModel):
        return _select_trees(model, choice, samples)
    on_gpu = choice == "auto" and cuda_available()
    if choice == "torch" or runtime.quantization is not None or on_gpu:
        return Selection(torch_backend(model, runtime))
    from kiln.runtime.onnx import OnnxBackend, check_parity, export_onnx

    try:
        graph = export_onnx(model, example)
        diff = check_parity(model, graph, samples)
    except ExportError as exc:
        if choice == "onnx":
            raise SpecError(f"backend onnx: {exc.message}", field="backend") from None
        return Selection(torch_backend(model, runtime))
    backend = OnnxBackend(graph, threads=torch.get_num_threads(), spinning=False)
    return Selection(backend, diff)


def _select_trees(model: nn.Module, choice: ServingChoice, samples: np.ndarray) -> Selection:
    """A gbdt model: ``torch`` means the model's own runtime (the booster's predictor),
    ``onnx`` an onnxmltools export checked against it (SpecError naming ``backend``
    if it fails or disagrees), ``auto`` the faster of the two as measured here."""
    from kiln.models.gbdt import GBDTModel
    from kiln.runtime.onnx import OnnxBackend
    from kiln.runtime.trees import (
        TreeBackend,
        check_tree_parity,
        choose_tree_backend,
        export_trees,
    )

    assert isinstance(model, GBDTModel)
    if choice == "torch":
        return Selection(TreeBackend(model))
    if choice == "auto":
        return choose_tree_backend(model, samples)
    try:
        graph = export_trees(model)
        diff = check_tree_parity(model, graph, samples)
    except ExportError as exc:
        raise SpecError(f"backend onnx: {exc.message}", field="backend") from None
    return Selection(OnnxBackend(graph, threads=model.threads, spinning=False), diff)


def recorded_generator(
    model: nn.Module | None, tokenizer: Any, runtime: RuntimeRecord, genai: Path | None
) -> Generator:
    """The generation engine a language-model bundle's runtime record names:
    onnxruntime-genai over its ``genai/`` folder (the int4/int8 variants ``kiln
    compress`` measured), or torch over the causal LM itself."""
    if runtime.backend == "onnxruntime-genai":
        if genai is None:
            raise BundleError(
                "the bundle's runtime is onnxruntime-genai but it has no genai/ model"
            )
        from kiln.runtime.genai import GenaiGenerator

        return GenaiGenerator(genai, tokenizer)
    if model is None:
        raise BundleError("the bundle has no torch weights to generate with")
    from kiln.runtime.generation import TorchGenerator

    if runtime.quantization == "int8_dynamic":  # a torch int8 variant: quantized at load
        from kiln.runtime.quantized import torch_int8

        model = torch_int8(model)
    base = getattr(model, "base_model", None)
    hf: Any = base() if callable(base) else model  # a CausalLM wraps the transformers model
    return TorchGenerator(hf, tokenizer)

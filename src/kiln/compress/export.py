"""``kiln export``: a bundle's model as ONNX, checked against torch on sample inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.bundle import ONNX_FILE, Bundle
from kiln.errors import ExportError, NotFoundError
from kiln.runtime.onnx import check_parity, export_onnx


def export_bundle(directory: str | Path, out: str | Path | None = None) -> tuple[Path, float]:
    """Export to ``out``, or into the bundle as ``model.onnx`` (a new manifest, written
    atomically). Returns the path and the measured max relative difference to torch."""
    bundle = Bundle.load(directory)
    if bundle.meta.runtime.quantization:
        raise ExportError("this variant is quantized; export its fp32 parent instead")
    onnx, diff = _export(bundle)
    if out is not None:
        target = Path(out)
        if target.is_dir():
            raise ExportError(f"{target} is a directory; give a file path", field="out")
        if not target.parent.is_dir():
            raise NotFoundError(f"folder not found: {target.parent}", field="out")
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(onnx)
        tmp.replace(target)
        return target, diff
    bundle.onnx = onnx
    bundle.save(directory)
    return Path(directory) / ONNX_FILE, diff


def _export(bundle: Bundle) -> tuple[bytes, float]:
    """The model as ONNX and its parity: traced torch, or for gbdt an onnxmltools
    conversion checked against the booster on native rows (NaN, category codes)."""
    from kiln.models.gbdt import GBDTModel

    if isinstance(bundle.model, GBDTModel):
        from kiln.runtime.trees import check_tree_parity, export_trees, tree_samples

        onnx = export_trees(bundle.model)
        samples = tree_samples(bundle.preprocessor.state.features, 256)
        return onnx, check_tree_parity(bundle.model, onnx, samples)
    onnx = export_onnx(bundle.model, bundle.example_input())
    return onnx, check_parity(bundle.model, onnx, random_inputs(bundle, 8))


def random_inputs(bundle: Bundle, rows: int, seed: int = 0) -> np.ndarray:
    """Encoded inputs that exercise every weight: normal features/pixels, or random
    token ids with a full attention mask."""
    rng = np.random.default_rng(seed)
    if bundle.preprocessor.kind == "text":
        ids = rng.integers(0, bundle.meta.n_inputs, size=(rows, 16))
        return np.stack([ids, np.ones_like(ids)], axis=1).astype(np.int64)
    shape = bundle.preprocessor.input_shape
    return rng.standard_normal((rows, *shape)).astype(np.float32)

"""The KServe v2 / Open Inference Protocol's request and response bodies.

Requests come as JSON, or with the binary-data extension standard clients use by
default (``tritonclient``): a JSON header of ``Inference-Header-Content-Length``
bytes followed by the raw tensors, in input order. Inputs are one FP32 tensor
``input`` of shape [N, F] in the schema's feature order, or one tensor per column
(BYTES for strings). An image column is a BYTES tensor of encoded images: base64 text
in JSON, raw bytes in the binary extension. Outputs ``predictions`` and
``probabilities`` come back as JSON. Whatever a request holds, a malformed one is a
DataError (422) naming the tensor, never a server error.

Missing values: the protocol has none (its JSON ``data`` holds numbers, booleans or
strings). kiln reads JSON ``null`` in any tensor's ``data`` and NaN in a binary
FP16/FP32/FP64 tensor as a missing value, which means what it means over REST
(``kiln.serve.model``): imputed where the bundle's preprocessing imputes the column, a
422 naming the row and column where it does not. ``NaN`` and ``Infinity`` literals are
not JSON and are refused; a binary tensor has no null, so a missing text or category
cannot be sent in binary BYTES (use JSON for that tensor).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from kiln.errors import DataError
from kiln.serve.model import Output, ServedModel

DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
FLOATS = frozenset({"FP16", "FP32", "FP64"})  # whose binary NaN is a missing value


def parse_body(body: bytes, header_length: str | None) -> dict[str, Any]:
    """The JSON part of a request, with each input's ``data`` filled in from binary chunks."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise DataError(
                "Inference-Header-Content-Length is not a number", field="header"
            ) from None
        if not 0 <= n <= len(body):
            raise DataError(
                "Inference-Header-Content-Length is past the end of the body", field="header"
            )
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        request = json.loads(head, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError):
        raise DataError("the request body is not JSON", field="body") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise DataError("the request needs an 'inputs' list", field="inputs")
    offset = 0
    for i, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict):
            raise DataError(f"inputs[{i}] must be an object", field=f"inputs[{i}]")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise DataError(
                f"inputs[{i}].parameters must be an object", field=f"inputs[{i}].parameters"
            )
        size = parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise DataError(
                    f"inputs[{i}]: binary_data_size must be a byte count",
                    field=f"inputs[{i}].parameters",
                )
            chunk = rest[offset : offset + size]
            if len(chunk) != size:
                raise DataError(
                    f"inputs[{i}]: binary data is shorter than announced", field=f"inputs[{i}]"
                )
            tensor["data"] = _decode_binary(chunk, _datatype(tensor.get("datatype"), i), i)
            offset += size
    return request


def _not_json(literal: str) -> Any:
    """Refuse the ``NaN`` and ``Infinity`` literals Python's parser would accept."""
    raise DataError(
        f"{literal} is not JSON (a missing value is null); the request body is not JSON",
        field="body",
    )


def _decode_binary(chunk: bytes, datatype: str, i: int) -> list[Any]:
    """The elements of input ``i``'s binary ``chunk``, of a checked ``datatype``."""
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then the bytes
        out: list[Any] = []
        pos = 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise DataError(
                    f"inputs[{i}]: BYTES element {len(out)} has a cut length prefix",
                    field=f"inputs[{i}]",
                )
            (length,) = struct.unpack_from("<I", chunk, pos)
            if pos + 4 + length > len(chunk):
                raise DataError(
                    f"inputs[{i}]: BYTES element {len(out)} is shorter than its length",
                    field=f"inputs[{i}]",
                )
            # kept as bytes: an image column takes them as they are, others as UTF-8
            out.append(chunk[pos + 4 : pos + 4 + length])
            pos += 4 + length
        return out
    width = np.dtype(DTYPES[datatype]).itemsize
    if len(chunk) % width:
        raise DataError(
            f"inputs[{i}]: {len(chunk)} bytes is not a whole number of {datatype} values",
            field=f"inputs[{i}]",
        )
    return np.frombuffer(chunk, dtype=DTYPES[datatype]).tolist()  # type: ignore[no-any-return]


def _datatype(datatype: object, i: int) -> str:
    """Input ``i``'s ``datatype``: BYTES or one of :data:`DTYPES`; else a DataError."""
    if datatype != "BYTES" and datatype not in DTYPES:
        shown = repr(datatype)[:40]
        raise DataError(
            f"inputs[{i}]: unsupported datatype {shown}; one of BYTES, {', '.join(DTYPES)}",
            field=f"inputs[{i}].datatype",
        )
    return str(datatype)


def to_rows_or_matrix(
    request: dict[str, Any], model: ServedModel
) -> tuple[list[dict[str, Any]] | None, np.ndarray | None]:
    """Either rows (one tensor per column) or a matrix (one tensor ``input`` [N, F])."""
    inputs = request["inputs"]
    if not inputs:
        raise DataError("inputs must hold at least one tensor", field="inputs")
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise DataError(f"inputs[{i}] must be an object", field=f"inputs[{i}]")
        _datatype(tensor.get("datatype"), i)
    kinds = dict(model.columns)
    if len(inputs) == 1 and inputs[0].get("name") == "input" and "input" not in kinds:
        tensor = inputs[0]
        shape = _shape(tensor.get("shape"), 0)
        values = _numbers(_flat(tensor.get("data"), 0))
        if len(shape) != 2 or values.size != shape[0] * shape[1]:
            raise DataError(f"input: shape {shape} does not match its data", field="input")
        return None, values.reshape(shape)
    columns: dict[str, list[Any]] = {}
    n = None
    for i, tensor in enumerate(inputs):
        name = tensor.get("name")
        shape = _shape(tensor.get("shape"), i)
        data = _flat(tensor.get("data"), i)
        if tensor["datatype"] in FLOATS:  # NaN (binary data) is a missing value, as null
            data = [None if isinstance(v, float) and math.isnan(v) else v for v in data]
        elif kinds.get(str(name)) != "image":  # text and categories: bytes are UTF-8
            data = [_text(v, i, j) for j, v in enumerate(data)]
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or len(data) != shape[0]:
            raise DataError(
                f"inputs[{i}] ({name}): a column tensor has shape [N] or [N, 1] matching its data",
                field=f"inputs[{i}].shape",
            )
        if n is not None and shape[0] != n:
            raise DataError("all column tensors need the same N", field=f"inputs[{i}].shape")
        n = shape[0]
        columns[str(name)] = data
    known = set(model.feature_order)
    unknown = sorted(set(columns) - known)
    if unknown:
        raise DataError(f"unknown input tensor(s): {', '.join(unknown)}", field="inputs")
    assert n is not None
    rows = [{name: values[j] for name, values in columns.items()} for j in range(n)]
    return rows, None


def _numbers(values: list[Any]) -> np.ndarray:
    """The ``input`` matrix's values as float64, ``null`` as NaN (a missing value, for
    ``ServedModel.check_matrix`` to fill or refuse); DataError for anything else."""
    for j, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(
                f"input: element {j} is {type(value).__name__}, not a number", field="input"
            )
    try:
        return np.asarray(values, dtype=np.float64)
    except OverflowError:
        raise DataError("input: a number is out of range", field="input") from None


def _text(value: Any, i: int, j: int) -> Any:
    """A BYTES element for a non-image column: bytes become text (UTF-8)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"inputs[{i}]: element {j} is not UTF-8 text", field=f"inputs[{i}].data"
            ) from None
    return value


def _shape(shape: object, i: int) -> list[int]:
    """Input ``i``'s ``shape``: a list of sizes; else a DataError."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"inputs[{i}].shape must be a list of sizes", field=f"inputs[{i}].shape")
    return shape


def _flat(data: object, i: int) -> list[Any]:
    """Input ``i``'s ``data``, nested lists flattened in row-major order."""
    if not isinstance(data, list):
        raise DataError(f"inputs[{i}].data must be a list", field=f"inputs[{i}].data")
    flat: list[Any] = []
    stack: list[Any] = [data]
    # nested lists (row-major) are allowed by the protocol; flatten them in order
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def response(name: str, version: int, output: Output, request: dict[str, Any]) -> dict[str, Any]:
    """The v2 response: ``predictions`` [N] and, for classes, ``probabilities`` [N, K]."""
    n = len(output.predictions)
    preds = output.predictions
    if preds and isinstance(preds[0], str):
        pred = {"name": "predictions", "datatype": "BYTES", "shape": [n], "data": preds}
    elif preds and all(isinstance(p, int) and not isinstance(p, bool) for p in preds):
        pred = {"name": "predictions", "datatype": "INT64", "shape": [n], "data": preds}
    else:
        pred = {
            "name": "predictions",
            "datatype": "FP32",
            "shape": [n],
            "data": [float(p) for p in preds],
        }
    outputs = [pred]
    if output.probabilities is not None:
        k = len(output.probabilities[0]) if n else 0
        flat = [float(v) for row in output.probabilities for v in row]
        outputs.append({"name": "probabilities", "datatype": "FP32", "shape": [n, k], "data": flat})
    wanted = [o.get("name") for o in request.get("outputs") or [] if isinstance(o, dict)]
    if wanted:
        outputs = [o for o in outputs if o["name"] in wanted]
    body: dict[str, Any] = {"model_name": name, "model_version": str(version), "outputs": outputs}
    if "id" in request:
        body["id"] = request["id"]
    return body


def metadata(name: str, versions: list[int], model: ServedModel) -> dict[str, Any]:
    numeric = all(kind == "numeric" for _, kind in model.columns)
    if numeric:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, len(model.columns)]}]
    else:
        inputs = [
            {"name": c, "datatype": "FP32" if kind == "numeric" else "BYTES", "shape": [-1]}
            for c, kind in model.columns
        ]
    labels = model.bundle.preprocessor.labels
    if labels is None:
        kind = "FP32"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        kind = "INT64"
    else:
        kind = "BYTES"
    outputs = [{"name": "predictions", "datatype": kind, "shape": [-1]}]
    if labels is not None:
        outputs.append({"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]})
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": f"kiln-{model.backend_name}",
        "inputs": inputs,
        "outputs": outputs,
    }

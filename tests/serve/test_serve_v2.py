"""KServe v2 bodies: JSON and the binary-data extension in, typed outputs back.

Binary bodies are built by hand here, byte by byte as the extension defines them: a
JSON header of ``Inference-Header-Content-Length`` bytes, then each tensor's raw data
in input order (FP32 little-endian; BYTES as a 4-byte little-endian length per element
followed by its UTF-8 bytes).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from serve_support import iris

from kiln.errors import DataError
from kiln.serve import v2
from kiln.serve.model import Output, ServedModel

FEATURES = list(iris().columns.drop("target"))


def binary(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, str]:
    """A binary-extension body and its Inference-Header-Content-Length value."""
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def fp32(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def strings(values: list[str]) -> bytes:
    out = b""
    for v in values:
        data = v.encode("utf-8")
        out += struct.pack("<I", len(data)) + data
    return out


def field_of(exc: pytest.ExceptionInfo[DataError]) -> str | None:
    return exc.value.field


# ---- parse_body ---------------------------------------------------------------------


def test_a_json_body_parses_as_is() -> None:
    request = {
        "id": "r1",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "predictions"}],
    }
    assert v2.parse_body(json.dumps(request).encode(), None) == request


def test_binary_fp32_data_is_decoded_little_endian() -> None:
    values = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    chunk = fp32(values)
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 4]}
    body, length = binary(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(chunk)}}]}, [chunk]
    )
    request = v2.parse_body(body, length)
    assert request["inputs"][0]["data"] == values.reshape(-1).tolist()
    assert request["inputs"][0]["shape"] == [2, 4]


def test_binary_tensors_are_read_in_input_order_with_their_own_sizes() -> None:
    x = fp32([1.5, -2.25, 3.0])
    colors = strings(["red", "grün", ""])  # multi-byte UTF-8 and an empty string
    ints = np.array([7, -8, 9], dtype="<i8").tobytes()
    header = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [3], "parameters": {"binary_data_size": 12}},
            {
                "name": "color",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(colors)},
            },
            {
                "name": "n",
                "datatype": "INT64",
                "shape": [3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "json", "datatype": "FP32", "shape": [1], "data": [4.0]},  # mixed in
        ]
    }
    request = v2.parse_body(*binary(header, [x, colors, ints]))
    data = [t["data"] for t in request["inputs"]]
    # BYTES stay bytes here (an image column takes them raw); text columns decode them
    assert data == [[1.5, -2.25, 3.0], [b"red", "grün".encode(), b""], [7, -8, 9], [4.0]]


def test_binary_data_shorter_than_announced_names_the_input() -> None:
    chunk = fp32([1.0, 2.0])
    header = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        ]
    }
    with pytest.raises(DataError) as exc:
        v2.parse_body(*binary(header, [chunk, chunk[:4]]))
    assert field_of(exc) == "inputs[1]"


def test_an_unsupported_binary_datatype_names_the_field() -> None:
    header = {
        "inputs": [
            {"name": "a", "datatype": "FP8", "shape": [1], "parameters": {"binary_data_size": 1}}
        ]
    }
    with pytest.raises(DataError) as exc:
        v2.parse_body(*binary(header, [b"\x00"]))
    assert field_of(exc) == "inputs[0].datatype"


@pytest.mark.parametrize(
    ("body", "length", "field"),
    [
        (b"not json", None, "body"),
        (b"\xff\xfe", None, "body"),
        (b'{"inputs": [1]}', "x1", "header"),
        (b"[1, 2]", None, "inputs"),
        (b'{"outputs": []}', None, "inputs"),
        (b'{"inputs": {"name": "input"}}', None, "inputs"),
        (b'{"inputs": [1]}', None, "inputs[0]"),
    ],
)
def test_malformed_bodies_name_the_field(body: bytes, length: str | None, field: str) -> None:
    with pytest.raises(DataError) as exc:
        v2.parse_body(body, length)
    assert field_of(exc) == field


# ---- tensors to rows ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(iris_bundle: Path) -> ServedModel:
    return ServedModel(iris_bundle, backend="torch")


def tensor(name: str, shape: list[int], data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def test_one_input_tensor_becomes_a_matrix_nested_or_flat(served: ServedModel) -> None:
    values = iris()[FEATURES].to_numpy()[:3]
    for data in (values.reshape(-1).tolist(), values.tolist(), [[list(r)] for r in values]):
        rows, matrix = v2.to_rows_or_matrix({"inputs": [tensor("input", [3, 4], data)]}, served)
        assert rows is None and matrix is not None
        np.testing.assert_array_equal(matrix, values)
    frame = served.check_matrix(matrix)
    assert list(frame.columns) == FEATURES


def test_one_tensor_per_column_becomes_rows(served: ServedModel) -> None:
    values = iris()[FEATURES].head(2)
    inputs = [tensor(c, [2], values[c].tolist()) for c in reversed(FEATURES)]  # any order
    inputs[0]["shape"] = [2, 1]  # [N, 1] is a column too
    rows, matrix = v2.to_rows_or_matrix({"inputs": inputs}, served)
    assert matrix is None
    assert rows == values.to_dict("records")
    pd.testing.assert_frame_equal(served.check_rows(rows), values.reset_index(drop=True))


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([tensor("input", [3, 4], [1.0] * 8)], "input"),  # data shorter than the shape
        ([tensor("input", [8], [1.0] * 8)], "input"),  # not [N, F]
        ([tensor("input", "2x4", [1.0] * 8)], "inputs[0].shape"),
        ([tensor("input", [2, -4], [1.0] * 8)], "inputs[0].shape"),
        ([tensor("input", [2, 4], "1,2,3")], "inputs[0].data"),
        ([tensor(FEATURES[0], [2], [1.0]), tensor(FEATURES[1], [1], [1.0])], "inputs[0].shape"),
        ([tensor(FEATURES[0], [2, 2], [1.0] * 4)], "inputs[0].shape"),
        (
            [tensor(FEATURES[0], [2], [1.0, 2.0]), tensor(FEATURES[1], [3], [1.0] * 3)],
            "inputs[1].shape",
        ),
        ([tensor(FEATURES[0], [1], [1.0]), tensor("colour", [1], [1.0])], "inputs"),
    ],
)
def test_bad_tensors_name_the_field(
    served: ServedModel, inputs: list[dict[str, Any]], field: str
) -> None:
    with pytest.raises(DataError) as exc:
        v2.to_rows_or_matrix({"inputs": inputs}, served)
    assert field_of(exc) == field


def test_a_matrix_of_the_wrong_width_or_with_nan_is_refused(served: ServedModel) -> None:
    with pytest.raises(DataError) as exc:
        served.check_matrix(np.ones((2, 3)))
    assert field_of(exc) == "input"
    bad = np.ones((3, 4))
    bad[2, 1] = np.inf
    with pytest.raises(DataError) as exc:
        served.check_matrix(bad)
    assert field_of(exc) == f"input[2].{FEATURES[1]}"


def test_null_in_the_matrix_is_a_missing_value_the_model_imputes(served: ServedModel) -> None:
    """iris imputes (missing: mean): null is NaN in the checked frame, for the encoder."""
    _, matrix = v2.to_rows_or_matrix({"inputs": [tensor("input", [1, 4], [None, 1, 2, 3])]}, served)
    assert matrix is not None
    frame = served.check_matrix(matrix)
    assert np.isnan(frame.iloc[0, 0]) and frame.iloc[0, 1:].tolist() == [1.0, 2.0, 3.0]


def test_missing_column_tensors_surface_as_a_missing_column(served: ServedModel) -> None:
    inputs = [tensor(c, [1], [1.0]) for c in FEATURES[1:]]
    rows, _ = v2.to_rows_or_matrix({"inputs": inputs}, served)
    with pytest.raises(DataError) as exc:
        served.check_rows(rows)
    assert field_of(exc) == f"inputs[0].{FEATURES[0]}"


# ---- responses ---------------------------------------------------------------------


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def test_class_labels_that_are_integers_come_back_int64_with_probabilities() -> None:
    output = Output(
        predictions=[2, 0], probabilities=[[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], labels=[0, 1, 2]
    )
    body = v2.response("iris", 3, output, {"id": "abc", "inputs": []})
    assert body["model_name"] == "iris"
    assert body["model_version"] == "3"
    assert body["id"] == "abc"
    out = outputs_by_name(body)
    assert out["predictions"] == {
        "name": "predictions",
        "datatype": "INT64",
        "shape": [2],
        "data": [2, 0],
    }
    assert out["probabilities"]["datatype"] == "FP32"
    assert out["probabilities"]["shape"] == [2, 3]
    assert out["probabilities"]["data"] == pytest.approx([0.1, 0.2, 0.7, 0.8, 0.1, 0.1])


def test_string_labels_come_back_bytes_and_numbers_fp32() -> None:
    body = v2.response("m", 1, Output(["yes", "no"], [[0.3, 0.7], [0.6, 0.4]], ["no", "yes"]), {})
    assert outputs_by_name(body)["predictions"]["datatype"] == "BYTES"
    assert outputs_by_name(body)["predictions"]["data"] == ["yes", "no"]
    assert "id" not in body
    body = v2.response("m", 1, Output([1.5, 2], None, None), {})
    assert [o["name"] for o in body["outputs"]] == ["predictions"]  # no classes: no probabilities
    assert body["outputs"][0] == {
        "name": "predictions",
        "datatype": "FP32",
        "shape": [2],
        "data": [1.5, 2.0],
    }


def test_only_the_requested_outputs_come_back() -> None:
    output = Output(predictions=[1], probabilities=[[0.4, 0.6]], labels=[0, 1])
    body = v2.response("m", 1, output, {"outputs": [{"name": "probabilities"}]})
    assert [o["name"] for o in body["outputs"]] == ["probabilities"]


def test_metadata_describes_the_matrix_input_and_typed_outputs(served: ServedModel) -> None:
    meta = v2.metadata("iris", [1, 2], served)
    assert meta["name"] == "iris"
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "predictions", "datatype": "BYTES", "shape": [-1]},  # setosa, ...
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    # what a response carries agrees with what the metadata announced
    output = served.predict_frame(served.check_matrix(iris()[FEATURES].to_numpy()[:2]))
    types = {o["name"]: o["datatype"] for o in v2.response("iris", 1, output, {})["outputs"]}
    assert types == {o["name"]: o["datatype"] for o in meta["outputs"]}


# ---- malformed tensors are 4xx, never 500 --------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([tensor("input", [1, 4], ["a", "b", "c", "d"])], "input"),  # strings in a matrix
        ([tensor("input", [1, 4], [True, 1.0, 2.0, 3.0])], "input"),
        ([tensor("input", [1, 4], [1e400, 1.0, 2.0, 3.0])], "input[0].sepal length (cm)"),
        ([tensor("input", [0, 4], [])], "input"),  # no rows
        ([tensor("input", [1, 4], [1.0] * 4, datatype="FP8")], "inputs[0].datatype"),
        ([tensor("input", [1, 4], [1.0] * 4, datatype=None)], "inputs[0].datatype"),  # type: ignore[arg-type]
        ([{"name": "input", "shape": [1, 4], "data": [1.0] * 4}], "inputs[0].datatype"),
        ([tensor(FEATURES[0], [1], ["x"], datatype="BYTES")], f"inputs[0].{FEATURES[0]}"),
        ([tensor(FEATURES[0], [1], [b"\xff"], datatype="BYTES")], "inputs[0].data"),
        ([], "inputs"),
        (["x"], "inputs[0]"),
    ],
)
def test_malformed_tensors_are_data_errors(
    served: ServedModel, inputs: list[Any], field: str
) -> None:
    with pytest.raises(DataError) as exc:
        rows, matrix = v2.to_rows_or_matrix({"inputs": inputs}, served)
        if matrix is not None:
            served.check_matrix(matrix)
        else:
            served.check_rows(rows)
    assert field_of(exc) == field


@pytest.mark.parametrize(
    ("parameters", "chunk", "length", "field"),
    [
        ({"binary_data_size": -4}, b"", None, "inputs[0].parameters"),
        ({"binary_data_size": "4"}, b"abcd", None, "inputs[0].parameters"),
        ({"binary_data_size": 1.5}, b"abcd", None, "inputs[0].parameters"),
        ([1, 2], b"", None, "inputs[0].parameters"),
        ({"binary_data_size": 2}, b"ab", None, "inputs[0]"),  # a cut length prefix
        ({"binary_data_size": 6}, struct.pack("<I", 9) + b"ab", None, "inputs[0]"),  # cut element
        ({"binary_data_size": 4}, b"abcd", "999999", "header"),  # header past the end
        ({"binary_data_size": 4}, b"abcd", "-1", "header"),
    ],
)
def test_malformed_binary_bodies_are_data_errors(
    parameters: Any, chunk: bytes, length: str | None, field: str
) -> None:
    header = {
        "inputs": [{"name": "c", "datatype": "BYTES", "shape": [1], "parameters": parameters}]
    }
    body, real = binary(header, [chunk])
    with pytest.raises(DataError) as exc:
        v2.parse_body(body, length or real)
    assert field_of(exc) == field


def test_binary_fp32_of_a_ragged_length_is_refused() -> None:
    header = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 3}}
        ]
    }
    with pytest.raises(DataError) as exc:
        v2.parse_body(*binary(header, [b"abc"]))
    assert field_of(exc) == "inputs[0]"

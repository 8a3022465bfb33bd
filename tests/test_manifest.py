"""kiln.json version 2 is typed; bundles written as version 1 still load and predict.

The fixtures under tests/fixtures/ were written by kiln before format version 2 (a
trained MLP, its pruned variant and its onnxruntime int8 variant).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.errors import BundleError
from kiln.manifest import FORMAT_VERSION, Lineage, Runtime, TrainingRecord, parse_manifest

FIXTURES = Path(__file__).parent / "fixtures"
ROWS = [
    {
        "sepal length (cm)": 5.1,
        "sepal width (cm)": 3.5,
        "petal length (cm)": 1.4,
        "petal width (cm)": 0.2,
    }
]


def test_a_version_1_bundle_loads_with_typed_sections():
    raw = json.loads((FIXTURES / "bundle-v1-iris" / "kiln.json").read_text())
    assert raw["format_version"] == 1
    bundle = Bundle.load(FIXTURES / "bundle-v1-iris")
    meta = bundle.meta
    assert meta.format_version == FORMAT_VERSION == 2
    assert isinstance(meta.runtime, Runtime) and meta.runtime.backend == "torch"
    assert isinstance(meta.training, TrainingRecord)
    assert meta.training.epochs_run == 3 == len(meta.training.history)
    assert meta.training.loss == "cross_entropy"
    assert isinstance(meta.lineage, Lineage)
    assert meta.lineage.data is not None and meta.lineage.data.source == "sklearn:iris"
    assert meta.lineage.split is not None and meta.lineage.split.train > 0
    assert meta.lineage.parent is None
    assert meta.model.type == "mlp"
    assert bundle.predict(ROWS).predictions[0] in meta.labels


def test_version_1_variants_keep_their_step_parent_and_runtime():
    pruned = Bundle.load(FIXTURES / "bundle-v1-iris-pruned").meta
    assert pruned.lineage.step is not None and pruned.lineage.step.kind == "prune"
    # structured pruning removed channels: fewer parameters, none of them zero
    assert pruned.lineage.step.parameters == pruned.parameters
    assert pruned.parameters < Bundle.load(FIXTURES / "bundle-v1-iris").meta.parameters
    int8 = Bundle.load(FIXTURES / "bundle-v1-iris-int8")
    meta = int8.meta
    assert meta.runtime.backend == "onnxruntime"
    assert meta.runtime.quantization == "int8_dynamic"
    assert meta.lineage.parent is not None and meta.lineage.parent.name == "iris-v1"
    assert meta.lineage.parent.runtime == Runtime()
    source = Bundle.load(FIXTURES / "bundle-v1-iris")
    a = np.asarray(int8.predict(ROWS).probabilities)
    b = np.asarray(source.predict(ROWS).probabilities)
    assert np.abs(a - b).max() < 0.1  # a pruned, int8 variant of the same model


def test_a_version_1_bundle_saved_again_is_version_2_and_round_trips(tmp_path):
    bundle = Bundle.load(FIXTURES / "bundle-v1-iris")
    bundle.save(tmp_path / "again")
    raw = json.loads((tmp_path / "again" / "kiln.json").read_text())
    assert raw["format_version"] == 2
    again = Bundle.load(tmp_path / "again")
    assert again.meta.training == bundle.meta.training
    assert again.meta.lineage == bundle.meta.lineage
    assert again.predict(ROWS).probabilities == bundle.predict(ROWS).probabilities


def test_an_unknown_key_in_a_typed_section_is_refused_by_its_path(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURES / "bundle-v1-iris", copy)
    raw = json.loads((copy / "kiln.json").read_text())
    raw["format_version"] = 2
    raw["training"]["epochz"] = 3
    with pytest.raises(BundleError, match=r"training\.epochz"):
        parse_manifest(raw, "kiln.json")


@pytest.mark.parametrize("version", [0, 3, "1", None])
def test_other_format_versions_are_refused(version):
    raw = json.loads((FIXTURES / "bundle-v1-iris" / "kiln.json").read_text())
    raw["format_version"] = version
    with pytest.raises(BundleError, match="not supported"):
        parse_manifest(raw, "kiln.json")

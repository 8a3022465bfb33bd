"""The public surface: every name in ``kiln.__all__`` resolves; importing kiln is cheap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kiln


@pytest.mark.parametrize("name", kiln.__all__)
def test_every_public_name_resolves(name):
    assert getattr(kiln, name) is not None


def test_public_names_are_the_real_objects():
    from kiln.bundle import Bundle, Predictions
    from kiln.client import Client
    from kiln.evaluate.crossval import crossval
    from kiln.spec import Spec, load_spec
    from kiln.workflow import fit

    assert kiln.Bundle is Bundle
    assert kiln.Predictions is Predictions
    assert kiln.Client is Client
    assert kiln.Spec is Spec
    assert kiln.load_spec is load_spec
    assert kiln.fit is fit
    assert kiln.crossval is crossval
    assert callable(kiln.load)
    assert kiln.__version__ == "0.1.0"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kiln.nope  # noqa: B018


def test_error_hierarchy():
    for cls in (
        kiln.SpecError,
        kiln.DataError,
        kiln.BundleError,
        kiln.NotFoundError,
        kiln.TrainingError,
        kiln.Interrupted,
    ):
        assert issubclass(cls, kiln.KilnError)
    codes = {
        cls.exit_code
        for cls in (kiln.SpecError, kiln.DataError, kiln.BundleError, kiln.NotFoundError)
    }
    assert len(codes) == 4  # each error maps to its own exit code
    err = kiln.DataError("bad value", field="x")
    assert err.to_dict() == {"code": "invalid_data", "message": "bad value", "field": "x"}
    assert kiln.SpecError("x").http_status == 422


IMPORT_PROBE = """
import json, sys
import kiln
import kiln.spec
spec = kiln.load_spec({
    "name": "x", "task": "classification",
    "data": {"source": "sklearn:iris", "target": "target"},
    "model": {"type": "linear"},
})
heavy = sorted(m for m in ("torch", "sklearn", "safetensors") if m in sys.modules)
print(json.dumps({"heavy": heavy, "name": spec.name}))
"""


def test_import_kiln_and_validating_a_spec_do_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {"heavy": [], "name": "x"}

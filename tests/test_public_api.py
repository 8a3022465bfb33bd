"""The public surface: ``kiln.__all__`` is exactly the list below, sorted, and every name
in it imports; nothing kiln defines at the top level is left out; importing kiln is cheap.

Adding (or removing) a public name is a decision: this list changes with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import ModuleType

import pytest

import kiln

PUBLIC = [
    "Bundle",
    "BundleError",
    "Client",
    "DataError",
    "EmbeddingBundle",
    "Interrupted",
    "KilnError",
    "LMBundle",
    "NotFoundError",
    "Predictions",
    "Spec",
    "SpecError",
    "TrainingError",
    "__version__",
    "crossval",
    "fit",
    "load",
    "load_spec",
]


def test_all_is_exactly_the_public_names_sorted() -> None:
    assert kiln.__all__ == PUBLIC
    assert sorted(PUBLIC) == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_imports(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from kiln import {name}", namespace)  # the statement a user writes
    assert namespace[name] is getattr(kiln, name)
    assert namespace[name] is not None


def test_every_name_kiln_defines_at_the_top_level_is_public() -> None:
    """httpx's rule: a top-level name of ours without an underscore is in ``__all__``."""
    ours = {
        name
        for name, value in vars(kiln).items()
        if not name.startswith("_")
        and not isinstance(value, ModuleType)  # submodules imported so far
        and getattr(value, "__module__", "").startswith("kiln")
    }
    assert ours <= set(kiln.__all__), sorted(ours - set(kiln.__all__))


def test_public_names_are_the_real_objects() -> None:
    from kiln.bundle import Bundle, Predictions
    from kiln.client import Client
    from kiln.spec import Spec, load_spec
    from kiln.train.crossval import crossval
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


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kiln.nope  # noqa: B018


def test_error_hierarchy() -> None:
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


def test_import_kiln_and_validating_a_spec_do_not_import_torch() -> None:
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

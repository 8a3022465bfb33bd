"""kiln: train, evaluate, compress and serve models from a declarative spec.

The public library API::

    import kiln
    bundle = kiln.fit("spec.yaml", out="models/wine")   # or a dict / kiln.Spec
    bundle = kiln.load("models/wine")
    bundle.predict([{"alcohol": 13.2, ...}])
    lm = kiln.load("models/orders")                      # a generation bundle: LMBundle
    lm.generate("Send 3 blue mugs to Oslo").text         # or lm.stream(...) for text deltas
    kiln.crossval("spec.yaml", folds=5)
    kiln.Client("http://127.0.0.1:8080", api_key="kiln_...")   # a kiln server (kiln up)

Heavy modules (torch) load on first use of these names, so importing ``kiln`` (and
running ``kiln --help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from kiln.errors import (
    BundleError,
    DataError,
    Interrupted,
    KilnError,
    NotFoundError,
    SpecError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
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

_LAZY = {
    "Bundle": ("kiln.bundle", "Bundle"),
    "Predictions": ("kiln.bundle", "Predictions"),
    "LMBundle": ("kiln.lm_bundle", "LMBundle"),
    "EmbeddingBundle": ("kiln.lm_bundle", "EmbeddingBundle"),
    "Client": ("kiln.client", "Client"),
    "Spec": ("kiln.spec", "Spec"),
    "load_spec": ("kiln.spec", "load_spec"),
    "fit": ("kiln.workflow", "fit"),
    "crossval": ("kiln.train.crossval", "crossval"),
}

if TYPE_CHECKING:
    from kiln.bundle import Bundle, Predictions
    from kiln.client import Client
    from kiln.lm_bundle import EmbeddingBundle, LMBundle
    from kiln.spec import Spec, load_spec
    from kiln.train.crossval import crossval
    from kiln.workflow import fit


def load(directory: str) -> Bundle | LMBundle | EmbeddingBundle:
    """Load a bundle directory (no code is executed, nothing is unpickled): a
    :class:`Bundle` (classification, regression), an :class:`LMBundle` (generation) or
    an :class:`EmbeddingBundle` (embedding), by the task its ``kiln.json`` records."""
    from kiln.bundle import Bundle
    from kiln.lm_bundle import EmbeddingBundle, LMBundle
    from kiln.lm_bundle_files import manifest_task

    task = manifest_task(directory)
    if task == "generation":
        return LMBundle.load(directory)
    if task == "embedding":
        return EmbeddingBundle.load(directory)
    return Bundle.load(directory)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")

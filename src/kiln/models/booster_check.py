"""Structural checks of saved boosters, run before the tree libraries parse them.

LightGBM's and XGBoost's native loaders trust the file: a wrong ``tree_sizes`` entry
aborts the process (an exception thrown inside OpenMP), a child index out of range
or a cycle reads out of bounds or loops forever at predict, and a crafted class
count stalls allocating outputs. A bundle is untrusted input and loading it must
never take the server down, so :func:`check_booster` reads the structure in Python
first (LightGBM model text as ``GBDT::LoadModelFromString`` and ``Tree::Tree(str)``
read it; XGBoost JSON as ``RegTree::LoadModel`` reads it) and raises a BundleError
naming the file and what is wrong. Only a file that passes reaches the library.

A tree that passes is a proper binary tree: every child index points forward (an
internal node's children come after it), every node and leaf is reached exactly
once, every split feature is an input column, and every array has the length its
node count says.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import TypeGuard

from kiln.errors import BundleError

MAX_CLASSES = 10_000
MAX_TREES = 1_000_000
MAX_FEATURES = 1_000_000
# XGBoost stores a categorical split as a bitset sized by its largest category
MAX_CATEGORY = 1 << 24
MAX_CATEGORY_WORDS = 1 << 24  # 32-bit words over all categorical splits: 64 MiB

_INT = rb"-?\d+"
_FLOAT = rb"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf|nan)"
_INTS = re.compile(rb"(?:" + _INT + rb"(?: " + _INT + rb")*)?")
_FLOATS = re.compile(rb"(?:" + _FLOAT + rb"(?: " + _FLOAT + rb")*)?", re.IGNORECASE)


def check_booster(library: str, data: bytes, per_round: int, name: str) -> None:
    """BundleError unless ``data`` is a well-formed booster of ``library`` growing
    ``per_round`` trees per boosting round (kiln's class count for multiclass)."""
    if library == "lightgbm":
        check_lightgbm(data, per_round, name)
    elif library == "xgboost":
        check_xgboost(data, per_round, name)
    else:
        raise BundleError(f"{name}: unknown booster library {library!r}")


# ---- LightGBM model text -------------------------------------------------------------

# every key Tree::ToString writes (Tree::Tree(str) reads at most 22 lines)
_TREE_KEYS = frozenset(
    {
        b"num_leaves",
        b"num_cat",
        b"split_feature",
        b"split_gain",
        b"threshold",
        b"decision_type",
        b"left_child",
        b"right_child",
        b"leaf_value",
        b"leaf_weight",
        b"leaf_count",
        b"internal_value",
        b"internal_weight",
        b"internal_count",
        b"cat_boundaries",
        b"cat_threshold",
        b"is_linear",
        b"shrinkage",
        b"leaf_const",
        b"num_features",
        b"leaf_features",
        b"leaf_coeff",
    }
)
_OBJECTIVES = frozenset(
    {
        b"regression",
        b"regression_l1",
        b"huber",
        b"fair",
        b"poisson",
        b"quantile",
        b"mape",
        b"gamma",
        b"tweedie",
        b"binary",
        b"multiclass",
        b"multiclassova",
        b"cross_entropy",
        b"cross_entropy_lambda",
        b"lambdarank",
        b"rank_xendcg",
    }
)
_CATEGORICAL, _MISSING_SHIFT = 1, 2  # decision_type bits: categorical, default left, missing


class _Fail:
    """Raises BundleError ``{file}: {where}: {what}``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, what: str) -> BundleError:
        return BundleError(f"{self.name}: {what}")


def check_lightgbm(data: bytes, per_round: int, name: str) -> None:
    """BundleError unless ``data`` is LightGBM model text whose header and trees are
    consistent (see the module docstring) with ``per_round`` trees per iteration."""
    fail = _Fail(name)
    if b"\0" in data or b"\r" in data:  # the C parser stops at NUL and splits at CR
        raise fail("NUL or carriage-return bytes in the model text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 ({exc})") from None
    lines = data.split(b"\n")
    first_tree = next((i for i, line in enumerate(lines) if line.startswith(b"Tree=")), None)
    if first_tree is None:
        raise fail("no Tree= block")
    header = _lightgbm_header(lines[:first_tree], fail)
    n_features, per_iteration = _check_lightgbm_header(header, per_round, fail)
    starts, blocks, end = _lightgbm_blocks(lines, first_tree, fail)
    if len(blocks) > MAX_TREES or len(blocks) % per_iteration:
        raise fail(f"{len(blocks)} trees, not a multiple of {per_iteration} (at most {MAX_TREES})")
    if b"tree_sizes" in header:
        _check_tree_sizes(header[b"tree_sizes"], lines, starts, end, fail)
    for index, block in enumerate(blocks):
        _check_lightgbm_tree(block, n_features, _Fail(f"{name}: Tree={index}"))


def _lightgbm_header(lines: Sequence[bytes], fail: _Fail) -> dict[bytes, bytes]:
    """The ``key=value`` lines before the first tree (the first line is ``tree``)."""
    if not lines or lines[0] != b"tree":
        raise fail("not LightGBM model text (no 'tree' first line)")
    header: dict[bytes, bytes] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        key, _, value = line.partition(b"=")
        multi = key in (b"feature_names", b"monotone_constraints")
        if key in header or (b"=" in value and not multi):
            raise fail(f"header line {number} ({line[:60]!r}) is repeated or malformed")
        header[key] = value
    return header


def _check_lightgbm_header(
    header: dict[bytes, bytes], per_round: int, fail: _Fail
) -> tuple[int, int]:
    """(input columns, trees per iteration) from a checked header."""
    if header.get(b"version") not in (b"v3", b"v4"):
        raise fail(f"model version {header.get(b'version')!r}, not v3/v4")
    for key in (b"num_class", b"num_tree_per_iteration"):
        value = header.get(key)
        if value != str(per_round).encode():
            shown = None if value is None else value[:20].decode(errors="replace")
            raise fail(f"{key.decode()} is {shown!r}, the manifest needs {per_round}")
    if per_round > MAX_CLASSES:
        raise fail(f"num_class {per_round} over {MAX_CLASSES}")
    _ints_of(header.get(b"label_index", b"x"), 1, fail, "label_index")
    (max_feature,) = _ints_of(header.get(b"max_feature_idx", b"x"), 1, fail, "max_feature_idx")
    if not 0 <= max_feature < MAX_FEATURES:
        raise fail(f"max_feature_idx {max_feature} not in 0..{MAX_FEATURES - 1}")
    n_features = max_feature + 1
    for key in (b"feature_names", b"feature_infos", b"monotone_constraints"):
        if key not in header and key == b"monotone_constraints":
            continue
        count = len(header.get(key, b"").split(b" ")) if header.get(key) else 0
        if count != n_features:
            raise fail(f"{key.decode()} has {count} entries for {n_features} features")
    _check_lightgbm_objective(header.get(b"objective"), per_round, fail)
    return n_features, per_round


def _check_lightgbm_objective(objective: bytes | None, classes: int, fail: _Fail) -> None:
    if objective is None:
        return
    words = objective.split(b" ")
    if words[0] not in _OBJECTIVES:
        raise fail(f"unknown objective {words[0][:40]!r}")
    for word in words[1:]:
        key, sep, value = word.partition(b":")
        if not sep or not re.fullmatch(_FLOAT, value, flags=re.IGNORECASE):
            raise fail(f"objective parameter {word[:40]!r} is not key:number")
        if key == b"num_class" and value != str(classes).encode():
            raise fail(f"objective num_class:{value[:20]!r} is not num_class={classes}")


def _lightgbm_blocks(
    lines: list[bytes], first: int, fail: _Fail
) -> tuple[list[int], list[dict[bytes, bytes]], int]:
    """Line numbers where each Tree= block starts, the blocks' fields, and the line
    of ``end of trees``."""
    starts: list[int] = []
    blocks: list[dict[bytes, bytes]] = []
    i = first
    while True:
        if i >= len(lines):
            raise fail("no 'end of trees' line")
        line = lines[i]
        if line == b"end of trees":
            return starts, blocks, i
        if not line:
            i += 1
            continue
        if line != b"Tree=%d" % len(blocks):
            raise fail(f"line {i + 1}: {line[:40]!r} where Tree={len(blocks)} belongs")
        starts.append(i)
        fields: dict[bytes, bytes] = {}
        i += 1
        while i < len(lines) and lines[i]:  # the tree's lines end at a blank line
            key, sep, value = lines[i].partition(b"=")
            if not sep or key not in _TREE_KEYS or key in fields:
                raise fail(f"line {i + 1}: {lines[i][:40]!r} is not a tree field")
            fields[key] = value
            i += 1
        blocks.append(fields)


def _check_tree_sizes(
    value: bytes, lines: list[bytes], starts: list[int], end: int, fail: _Fail
) -> None:
    """LightGBM slices the text at ``tree_sizes`` (bytes per Tree= block) and parses
    the slices in parallel: every size must be the block's exact length."""
    sizes = _ints_of(value, len(starts), fail, "tree_sizes")
    bounds = [*starts, end]
    for index, size in enumerate(sizes):
        actual = sum(len(line) + 1 for line in lines[bounds[index] : bounds[index + 1]])
        if size != actual:
            raise fail(f"tree_sizes says Tree={index} is {size} bytes, it is {actual}")


def _check_lightgbm_tree(fields: dict[bytes, bytes], n_features: int, fail: _Fail) -> None:
    """One tree's arrays: lengths from num_leaves, children, features, categories."""
    for key in (b"num_leaves", b"num_cat", b"leaf_value"):
        if key not in fields:
            raise fail(f"no {key.decode()}")
    (leaves,) = _ints_of(fields[b"num_leaves"], 1, fail, "num_leaves")
    (num_cat,) = _ints_of(fields[b"num_cat"], 1, fail, "num_cat")
    if leaves < 1 or not 0 <= num_cat < max(leaves, 1):
        raise fail(f"num_leaves {leaves}, num_cat {num_cat}")
    if fields.get(b"is_linear", b"0") != b"0":
        raise fail("linear trees are not supported")
    if b"shrinkage" in fields:
        _floats_of(fields[b"shrinkage"], 1, fail, "shrinkage")
    _floats_of(fields[b"leaf_value"], leaves, fail, "leaf_value")
    if leaves == 1:  # a constant tree: LightGBM reads nothing else
        return
    nodes = leaves - 1
    if b"leaf_weight" in fields:
        _floats_of(fields[b"leaf_weight"], leaves, fail, "leaf_weight")
    if b"leaf_count" in fields:
        _ints_of(fields[b"leaf_count"], leaves, fail, "leaf_count")
    for key in (b"split_gain", b"internal_value", b"internal_weight"):
        if key in fields:
            _floats_of(fields[key], nodes, fail, key.decode())
    if b"internal_count" in fields:
        _ints_of(fields[b"internal_count"], nodes, fail, "internal_count")
    for key in (b"split_feature", b"threshold", b"left_child", b"right_child"):
        if key not in fields:
            raise fail(f"no {key.decode()}")
    features = _ints_of(fields[b"split_feature"], nodes, fail, "split_feature")
    if any(not 0 <= f < n_features for f in features):
        raise fail(f"split_feature outside 0..{n_features - 1}")
    left = _ints_of(fields[b"left_child"], nodes, fail, "left_child")
    right = _ints_of(fields[b"right_child"], nodes, fail, "right_child")
    _check_children(left, right, leaves, fail)
    thresholds = _floats_of(fields[b"threshold"], nodes, fail, "threshold")
    decisions = _ints_of(
        fields.get(b"decision_type", b"0" + b" 0" * (nodes - 1)), nodes, fail, "decision_type"
    )
    for node, decision in enumerate(decisions):
        # bits: 1 categorical, 2 default left, 4-8 missing type (0 none, 1 zero, 2 NaN)
        if not 0 <= decision < 16 or decision >> _MISSING_SHIFT == 3:
            raise fail(f"decision_type {decision} of node {node}")
        if decision & _CATEGORICAL:
            cat = thresholds[node]  # the index of the node's bitset in cat_boundaries
            if not (math.isfinite(cat) and cat.is_integer() and 0 <= cat < num_cat):
                raise fail(f"categorical node {node} names category set {cat} of {num_cat}")
    if num_cat:
        _check_lightgbm_categories(fields, num_cat, fail)


def _check_children(left: list[int], right: list[int], leaves: int, fail: _Fail) -> None:
    """Children of internal node i: j > i (node j) or ~k (leaf k); each node but the
    root and each leaf has exactly one parent. With 2(L-1) child slots, L leaves and
    L-2 non-root nodes, distinct in-range targets cover them all: a proper tree."""
    nodes = leaves - 1
    seen_nodes = bytearray(nodes)
    seen_leaves = bytearray(leaves)
    for node in range(nodes):
        for child in (left[node], right[node]):
            if child >= 0:
                if not node < child < nodes or seen_nodes[child]:
                    raise fail(f"node {node} has child node {child} (of {nodes}, forward only)")
                seen_nodes[child] = 1
            else:
                leaf = ~child
                if leaf >= leaves or seen_leaves[leaf]:
                    raise fail(f"node {node} has child leaf {leaf} (of {leaves}, once each)")
                seen_leaves[leaf] = 1


def _check_lightgbm_categories(fields: dict[bytes, bytes], num_cat: int, fail: _Fail) -> None:
    """cat_boundaries: num_cat + 1 offsets from 0 up to len(cat_threshold) (bitsets of
    32-bit words, one per categorical split)."""
    if b"cat_boundaries" not in fields or b"cat_threshold" not in fields:
        raise fail("num_cat > 0 without cat_boundaries/cat_threshold")
    bounds = _ints_of(fields[b"cat_boundaries"], num_cat + 1, fail, "cat_boundaries")
    if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)):
        raise fail("cat_boundaries not rising from 0")
    words = _ints_of(fields[b"cat_threshold"], bounds[-1], fail, "cat_threshold")
    if any(not 0 <= w < 1 << 32 for w in words):
        raise fail("cat_threshold word outside 32 bits")


def _ints_of(value: bytes, count: int, fail: _Fail, what: str) -> list[int]:
    """``count`` space-separated integers."""
    if not _INTS.fullmatch(value):
        raise fail(f"{what} is not a list of integers")
    numbers = [int(v) for v in value.split()]
    if len(numbers) != count:
        raise fail(f"{what} has {len(numbers)} entries, {count} expected")
    return numbers


def _floats_of(value: bytes, count: int, fail: _Fail, what: str) -> list[float]:
    """``count`` space-separated numbers."""
    if not _FLOATS.fullmatch(value):
        raise fail(f"{what} is not a list of numbers")
    numbers = [float(v) for v in value.split()]
    if len(numbers) != count:
        raise fail(f"{what} has {len(numbers)} entries, {count} expected")
    return numbers


# ---- XGBoost JSON --------------------------------------------------------------------

JsonObject = dict[str, object]
_NO_PARENT = (2147483647, -1)  # the root's parent as RegTree::SaveModel writes it


def check_xgboost(data: bytes, per_round: int, name: str) -> None:
    """BundleError unless ``data`` is an XGBoost gbtree model in JSON whose learner
    parameters and trees are consistent (see the module docstring), with
    ``max(1, num_class)`` = ``per_round``."""
    fail = _Fail(name)
    if not data.startswith(b"{"):
        raise fail("not an XGBoost JSON model")
    try:
        # duplicate keys would let Python and XGBoost read different trees
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"not valid JSON ({str(exc)[:120]})") from None
    learner = _obj(_as_obj(doc, fail, "the model"), "learner", fail)
    params = _obj(learner, "learner_model_param", fail)
    num_class = _int_text(params, "num_class", 0, MAX_CLASSES, fail)
    num_feature = _int_text(params, "num_feature", 1, MAX_FEATURES, fail)
    if params.get("num_target", "1") != "1":
        raise fail(f"num_target {params.get('num_target')!r}: multi-target is not supported")
    groups = max(1, num_class)
    if groups != per_round:
        raise fail(f"num_class is {num_class}, the manifest needs {per_round} trees per round")
    _check_xgboost_learner(learner, params, num_class, num_feature, fail)
    booster = _obj(learner, "gradient_booster", fail)
    if booster.get("name") != "gbtree":
        raise fail(f"gradient booster {str(booster.get('name'))[:40]!r}, not gbtree")
    model = _obj(booster, "model", fail)
    trees = _check_xgboost_forest(model, groups, fail)
    budget = [MAX_CATEGORY_WORDS]
    for index, tree in enumerate(trees):
        _check_xgboost_tree(tree, index, num_feature, budget, _Fail(f"{name}: tree {index}"))


def _check_xgboost_learner(
    learner: JsonObject, params: JsonObject, num_class: int, num_feature: int, fail: _Fail
) -> None:
    """base_score, feature names/types and the objective's class count."""
    base = params.get("base_score", "0.5")
    if not isinstance(base, str):
        raise fail("base_score is not text")
    scores = base.strip("[]").split(",")
    if not all(re.fullmatch(_FLOAT.decode(), s, flags=re.I) for s in scores) or len(scores) not in (
        1,
        max(1, num_class),
    ):
        raise fail(f"base_score {base[:40]!r}")
    for key in ("feature_names", "feature_types"):
        values = learner.get(key, [])
        if not isinstance(values, list) or len(values) not in (0, num_feature):
            raise fail(f"{key} is not a list of {num_feature}")
    objective = _obj(learner, "objective", fail)
    softmax = objective.get("softmax_multiclass_param")
    if softmax is not None:
        declared = _int_text(_as_obj(softmax, fail, "objective"), "num_class", 1, MAX_CLASSES, fail)
        if declared != num_class:
            raise fail(f"objective num_class {declared} is not num_class {num_class}")


def _check_xgboost_forest(model: JsonObject, groups: int, fail: _Fail) -> list[JsonObject]:
    """gbtree model: tree count, tree_info (each tree's output column), iteration
    boundaries, no stored category encodings (kiln boosts on codes)."""
    tree_param = _obj(model, "gbtree_model_param", fail)
    n_trees = _int_text(tree_param, "num_trees", 0, MAX_TREES, fail)
    _int_text(tree_param, "num_parallel_tree", 1, 1, fail)
    trees = model.get("trees")
    info = model.get("tree_info")
    if not isinstance(trees, list) or len(trees) != n_trees:
        raise fail(f"trees is not a list of num_trees={n_trees}")
    if not _int_list(info, n_trees) or any(not 0 <= g < groups for g in info):
        raise fail(f"tree_info is not {n_trees} output columns in 0..{groups - 1}")
    if "iteration_indptr" in model:
        bounds = model["iteration_indptr"]
        if not _int_list(bounds, None) or not bounds or bounds[0] != 0 or bounds[-1] != n_trees:
            raise fail("iteration_indptr does not run from 0 to num_trees")
        if any(b < a for a, b in itertools.pairwise(bounds)):
            raise fail("iteration_indptr is not rising")
    cats = model.get("cats", {})
    if not isinstance(cats, dict) or any(v != [] for v in cats.values()):
        raise fail("stored category encodings are not supported")
    return [_as_obj(tree, fail, f"tree {i}") for i, tree in enumerate(trees)]


def _check_xgboost_tree(
    tree: JsonObject, index: int, num_feature: int, budget: list[int], fail: _Fail
) -> None:
    """Array lengths = num_nodes; children forward and consistent with parents;
    split indices of internal nodes < num_feature; categorical splits consistent."""
    param = _obj(tree, "tree_param", fail)
    n = _int_text(param, "num_nodes", 1, 2**31 - 2, fail)
    _int_text(param, "num_deleted", 0, n, fail)
    if _int_text(param, "num_feature", 0, MAX_FEATURES, fail) != num_feature:
        raise fail(f"tree num_feature is not the learner's {num_feature}")
    _int_text(param, "size_leaf_vector", 0, 1, fail)  # > 1: a multi-target tree
    if tree.get("id") != index:
        raise fail(f"id {str(tree.get('id'))[:20]} is not its place {index}")
    for key in ("loss_changes", "sum_hessian", "base_weights", "split_conditions"):
        if not _number_list(tree.get(key), n):
            raise fail(f"{key} is not {n} numbers")
    arrays: dict[str, list[int]] = {}
    for key in ("left_children", "right_children", "parents", "split_indices", "default_left"):
        values = tree.get(key)
        if not _int_list(values, n):
            raise fail(f"{key} is not {n} integers")
        arrays[key] = values
    left, right, parents = arrays["left_children"], arrays["right_children"], arrays["parents"]
    if parents[0] not in _NO_PARENT or any(not 0 <= p < n for p in parents[1:]):
        raise fail("parents out of range")
    split = arrays["split_indices"]
    for node in range(n):
        a, b = left[node], right[node]
        if a == -1 and b == -1:
            continue  # a leaf (or a node the pruner deleted)
        if not (node < a < n and node < b < n and a != b):
            raise fail(f"node {node} has children {a}, {b} (of {n}, forward only)")
        if parents[a] != node or parents[b] != node:
            raise fail(f"node {node}'s children name other parents")
        if not 0 <= split[node] < num_feature:
            raise fail(f"node {node} splits on feature {split[node]} of {num_feature}")
    _check_xgboost_categories(tree, n, budget, fail)


def _check_xgboost_categories(tree: JsonObject, n: int, budget: list[int], fail: _Fail) -> None:
    """split_type 1 marks the categorical nodes, listed in categories_nodes (rising)
    with a non-empty [segment, segment + size) range of ``categories`` each."""
    if "split_type" not in tree:
        return
    kinds, nodes = tree.get("split_type"), tree.get("categories_nodes")
    segments, sizes = tree.get("categories_segments"), tree.get("categories_sizes")
    categories = tree.get("categories")
    if not (_int_list(kinds, n) and _int_list(nodes, None) and _int_list(categories, None)):
        raise fail("split_type / categories_nodes / categories are not integer lists")
    if not (_int_list(segments, len(nodes)) and _int_list(sizes, len(nodes))):
        raise fail("categories_segments / categories_sizes do not match categories_nodes")
    if any(k not in (0, 1) for k in kinds) or nodes != [i for i, k in enumerate(kinds) if k]:
        raise fail("categories_nodes are not the nodes split_type marks categorical")
    for node, start, size in zip(nodes, segments, sizes, strict=True):
        if not (size >= 1 and start >= 0 and start + size <= len(categories)):
            raise fail(f"categorical node {node}: categories [{start}, {start}+{size})")
        chosen = categories[start : start + size]
        if any(not 0 <= c < MAX_CATEGORY for c in chosen):
            raise fail(f"categorical node {node}: a category outside 0..{MAX_CATEGORY - 1}")
        budget[0] -= max(chosen) // 32 + 1
        if budget[0] < 0:
            raise fail("categorical splits too large")


def _unique_keys(pairs: list[tuple[str, object]]) -> JsonObject:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a repeated key")
    return doc


def _as_obj(value: object, fail: _Fail, what: str) -> JsonObject:
    if not isinstance(value, dict):
        raise fail(f"{what} is not an object")
    return value


def _obj(parent: JsonObject, key: str, fail: _Fail) -> JsonObject:
    return _as_obj(parent.get(key), fail, key)


def _int_text(parent: JsonObject, key: str, low: int, high: int, fail: _Fail) -> int:
    """An integer XGBoost keeps as text (``"num_class": "3"``), within [low, high]."""
    value = parent.get(key)
    if not isinstance(value, str) or not re.fullmatch(r"-?\d{1,12}", value):
        raise fail(f"{key} is {str(value)[:20]!r}, not an integer")
    number = int(value)
    if not low <= number <= high:
        raise fail(f"{key} {number} not in {low}..{high}")
    return number


def _int_list(value: object, count: int | None) -> TypeGuard[list[int]]:
    """A list of ``count`` (any: None) JSON integers (not booleans)."""
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(type(v) is int for v in value)
    )


def _number_list(value: object, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(type(v) is int or type(v) is float for v in value)
    )

"""A train key learns nothing about the server's filesystem from ``data.source``.

Spec validation asks the local filesystem whether a source is an image folder (which may
then omit ``data.target``). Through the server a source must be ``dataset:<id>`` or
``sklearn:<name>``, and that is checked by its form alone, first: an existing folder and
a missing one get the same answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.conftest import Platform
from kiln.settings import Settings


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, str, Path]]:
    root = tmp_path_factory.mktemp("source-oracle")
    folder = root / "secret-images"
    (folder / "cats").mkdir(parents=True)
    p = Platform(Settings(home=root / "home"))
    p.create_project("alpha")
    key = p.create_key("alpha", ["read", "train"])
    yield p, key, folder
    p.close()


def spec(source: str, *, target: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"source": source}
    if target:
        data["target"] = "label"
    return {
        "name": "probe",
        "task": "classification",
        "data": data,
        "model": {"type": "cnn"},
        "train": {"epochs": 1},
    }


@pytest.mark.parametrize("target", [False, True])
def test_existing_and_missing_folders_get_one_answer(
    world: tuple[Platform, str, Path], target: bool
) -> None:
    p, key, folder = world
    answers = []
    for source in (str(folder), str(folder.parent / "nowhere"), f"file://{folder}"):
        r = p.post("/jobs", key, {"kind": "train", "spec": spec(source, target=target)})
        assert r.status_code == 422, r.text
        answers.append(r.json()["error"])
    assert answers[0]["field"] == "spec.data.source"
    assert all(a == answers[0] for a in answers), answers
    assert str(folder) not in answers[0]["message"]

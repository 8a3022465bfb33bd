"""A train job of a gbdt spec on the real queue and worker: it succeeds, logs one
epoch per boosting round, and registers a version whose bundle loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worker import Platform, make_platform

import kiln
from kiln.bundle import Bundle
from kiln.jobs.queue import new_job
from kiln.lifecycle import JobState
from kiln.models.gbdt import GBDTModel
from kiln.settings import Settings
from kiln.store.projects import ensure_project

ROUNDS = 12


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    settings = Settings(home=tmp_path / "home", heartbeat_seconds=0.1, heartbeat_timeout=30)
    made = make_platform(tmp_path, settings)
    yield made
    made.db.dispose()


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_a_gbdt_train_job_registers_a_loadable_version(
    platform: Platform, tmp_path: Path, library: str
) -> None:
    spec = {
        "name": "wine-trees",
        "task": "classification",
        "data": {"source": platform.dataset, "target": "target", "split": {"val": 0.2}},
        "model": {"type": "gbdt", "library": library, "n_estimators": ROUNDS, "num_leaves": 8},
        "train": {"early_stopping": {"patience": 50, "metric": "val_loss"}},
    }
    with platform.db.session() as session:
        job_id = new_job(
            session, ensure_project(session, "default"), "train", spec, max_attempts=1
        ).id
    platform.worker().run(until_idle=True)
    job = platform.job(job_id)
    assert job.state == JobState.succeeded, job.error
    assert job.progress == {"epoch": ROUNDS, "epochs": ROUNDS}
    series = platform.series(job_id)
    assert [e["epoch"] for e in series] == list(range(1, ROUNDS + 1))
    assert all("val_accuracy" in e for e in series)

    version = platform.version(job)
    assert version.summary["model"] == "gbdt"
    assert version.summary["parameters"] == 0
    assert version.summary["epochs_run"] == ROUNDS
    names = [name for name, _ in version.summary["importance"]]
    assert len(names) == 13 and "proline" in names  # wine's 13 columns, by gain
    booster = "booster.txt" if library == "lightgbm" else "booster.json"
    files = platform.store.list(version.artifact_key)
    assert booster in {key.rsplit("/", 1)[-1] for key in files}

    local = tmp_path / "fetched"
    platform.store.get_dir(version.artifact_key, local)
    bundle = kiln.load(str(local))
    assert isinstance(bundle, Bundle) and isinstance(bundle.model, GBDTModel)
    assert bundle.model.summary().rounds == ROUNDS
    assert bundle.meta.metrics["test"]["accuracy"] > 0.8
    assert bundle.meta.metrics == version.metrics

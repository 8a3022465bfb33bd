"""Upload limits on what a table holds (rows, cells, decompressed bytes), compressed
uploads that train, and upload copies that live in $KILN_HOME/scratch and never stay."""

from __future__ import annotations

import gzip

import pytest

from kiln.store.tables import Dataset

ROWS = b"x1,x2,label\n" + b"1.0,2.0,a\n3.0,4.0,b\n" * 50  # 100 rows, 300 cells, 1012 bytes
SMALL = b"x1,x2,label\n1.0,2.0,a\n3.0,4.0,b\n"


def _scratch_uploads(platform) -> list:
    return list((platform.settings.home_dir / "scratch").rglob("kiln-upload-*"))


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"max_dataset_rows": 99}, "KILN_MAX_DATASET_ROWS"),
        ({"max_dataset_cells": 299}, "KILN_MAX_DATASET_CELLS"),
        ({"max_decompressed_mb": 0.0009}, "KILN_MAX_DECOMPRESSED_MB"),  # 943 bytes
    ],
)
def test_a_table_past_a_limit_is_413_naming_it_and_stores_nothing(
    make_platform, settings, variable
) -> None:
    platform = make_platform(**settings)
    assert platform.upload(platform.admin, gzip.compress(SMALL), "ok.csv.gz").status_code == 201
    before = platform.artifact_files()
    r = platform.upload(platform.admin, gzip.compress(ROWS), "big.csv.gz")
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "too_large" and error["field"] == "file"
    assert variable in error["message"] and "big.csv.gz" in error["message"]
    assert platform.count(Dataset) == 1 and platform.artifact_files() == before
    assert _scratch_uploads(platform) == []
    audit = platform.get("/audit", platform.admin).json()["items"][0]
    assert (audit["action"], audit["status"], audit["outcome"]) == (
        "datasets.upload",
        413,
        "too_large",
    )


def test_refused_and_accepted_uploads_leave_no_copy_in_scratch(platform) -> None:
    assert platform.upload(platform.admin, b"a,b\n", "norows.csv").status_code == 422
    assert platform.upload(platform.admin, b"\xff\xfe", "bad.csv").status_code == 422
    assert platform.upload(platform.admin, ROWS, "good.csv").status_code == 201
    scratch = platform.settings.home_dir / "scratch"
    assert scratch.is_dir()  # the copies were made there, not in /tmp ...
    assert _scratch_uploads(platform) == []  # ... and removed


def test_a_gzipped_table_trains(platform) -> None:
    data = gzip.compress(platform.csv("iris"))
    r = platform.upload(platform.admin, data, "iris.csv.gz")
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["rows"], r.json()["name"]) == ("csv", 150, "iris")
    job_id = platform.queued(platform.admin, "train", platform.spec(r.json()["ref"], epochs=1))
    platform.run_jobs()
    job = platform.get(f"/jobs/{job_id}", platform.admin).json()
    assert job["state"] == "succeeded", job

"""kiln.store.datasets as a service: what a stored dataset row holds, an archive's
layout, and a refused dataset leaving nothing behind."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kiln.errors import DataError, QuotaError
from kiln.store.artifacts import ArtifactStore, open_store
from kiln.store.datasets import (
    IMAGE_FOLDER_FORMAT,
    ImportSources,
    Intake,
    archive_root,
    import_uri,
    ingest,
)
from kiln.store.db import Database, migrate
from kiln.store.projects import ensure_project
from kiln.store.tables import Dataset, UsageEvent


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Database, ArtifactStore]]:
    url = f"sqlite:///{tmp_path / 'kiln.db'}"
    migrate(url)
    db = Database(url)
    yield db, open_store(str(tmp_path / "artifacts"))
    db.dispose()


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("x,colour,y\n1.5,red,0\n2.5,blue,1\n3.5,red,0\n", encoding="utf-8")
    return path


def test_a_table_is_stored_with_its_columns_and_metered(
    world: tuple[Database, ArtifactStore], tmp_path: Path
) -> None:
    db, store = world
    with db.session() as s:
        project = ensure_project(s, "default")
        row = ingest(Intake(s, store, project), name="t", filename="t.csv", path=_csv(tmp_path))
        dataset_id = row.id
    with db.session() as s:
        row = s.get(Dataset, dataset_id)
        assert row is not None
        assert (row.format, row.rows, row.source) == ("csv", 3, "upload")
        assert [list(c) for c in row.columns] == [["name", "kind", "dtype"]] * 3
        assert [(c["name"], c["kind"]) for c in row.columns] == [
            ("x", "numeric"),
            ("colour", "categorical"),
            ("y", "numeric"),
        ]
        assert row.artifact_key == f"projects/default/datasets/{dataset_id}/t.csv"
        assert store.exists(row.artifact_key) and archive_root(row) is None
        metered = s.scalar(select(UsageEvent.quantity).where(UsageEvent.subject == dataset_id))
        assert metered == row.size_bytes == _csv(tmp_path).stat().st_size


def test_a_refused_dataset_stores_nothing(
    world: tuple[Database, ArtifactStore], tmp_path: Path
) -> None:
    db, store = world

    def over_quota(size: int) -> None:
        raise QuotaError(f"{size} bytes is over the quota", field="file")

    with db.session() as s, pytest.raises(QuotaError):
        project = ensure_project(s, "default")
        intake = Intake(s, store, project, before_store=over_quota)
        ingest(intake, name="t", filename="t.csv", path=_csv(tmp_path))
    assert store.list("projects") == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Dataset)) == 0


def test_an_image_folder_archive_is_stored_under_its_files_prefix(
    world: tuple[Database, ArtifactStore], tmp_path: Path
) -> None:
    from PIL import Image

    db, store = world
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for label in ("cat", "dog"):
            for i in range(2):
                image = tmp_path / f"{label}{i}.png"
                Image.new("RGB", (4, 4), (i * 60, 0, 0)).save(image)
                zf.write(image, f"{label}/{i}.png")
    with db.session() as s:
        project = ensure_project(s, "default")
        row = ingest(Intake(s, store, project), name="pets", filename="pets.zip", path=archive)
        assert (row.format, row.rows) == (IMAGE_FOLDER_FORMAT, 4)
        assert [c["name"] for c in row.columns] == ["image", "label"]
        assert row.artifact_key == f"projects/default/datasets/{row.id}/files"
        assert archive_root(row) == row.artifact_key
        assert len(store.list(row.artifact_key)) == 4


def test_import_reads_only_under_the_data_roots(
    world: tuple[Database, ArtifactStore], tmp_path: Path
) -> None:
    db, store = world
    root = tmp_path / "roots"
    root.mkdir()
    inside = root / "t.csv"
    inside.write_bytes(_csv(tmp_path).read_bytes())
    with db.session() as s:
        project = ensure_project(s, "default")
        intake, sources = Intake(s, store, project), ImportSources(data_roots=[root])
        row = import_uri(intake, name="t", uri=str(inside), sources=sources)
        assert (row.source, row.rows) == (str(inside), 3)
        with pytest.raises(DataError) as refused:
            import_uri(intake, name="u", uri=str(tmp_path / "t.csv"), sources=sources)
    assert refused.value.field == "uri"

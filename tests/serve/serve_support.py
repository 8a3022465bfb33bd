"""Helpers of the serving tests: iris rows, a trained home, real servers on 127.0.0.1.

``trained_home`` trains two versions of an ``iris`` model through the job queue (a
worker runs them) once per session, with keys of several scopes and a second project;
tests copy it (``home_copy``) so each server owns its database and artifacts.
``serve(settings)`` runs ``create_app`` under uvicorn from a thread on a port the OS
picks, building its own services, as ``kiln up`` does — so a second ``serve`` on the
same home is a real restart.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from support import serve_app

TARGET = "target"


@functools.cache
def iris() -> pd.DataFrame:
    from sklearn.datasets import load_iris

    frame: pd.DataFrame = load_iris(as_frame=True).frame
    return frame


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` iris feature rows as JSON-ready dicts (wrapping around the table)."""
    table = iris().drop(columns=TARGET)
    picked = [table.iloc[(start + i) % len(table)] for i in range(n)]
    return [{k: float(v) for k, v in row.items()} for row in picked]


def train_spec(epochs: int) -> dict[str, Any]:
    return {
        "name": "iris",
        "task": "classification",
        "data": {"source": "sklearn:iris", "target": TARGET},
        "model": {"type": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "device": "cpu", "optimizer": {"name": "adam", "lr": 0.05}},
    }


@dataclass
class Home:
    """A kiln home with model ``iris`` v1 and v2 in project ``default``."""

    path: Path
    admin: str  # global admin key
    keys: dict[str, str]  # predict, read, deploy (project default); other (project other)
    bundles: dict[int, str] = field(default_factory=dict)  # version -> artifact key

    def artifact_dir(self, version: int) -> Path:
        """Where the version's (encrypted) bundle files lie in the artifact store."""
        return self.path / "artifacts" / self.bundles[version]

    def bundle_dir(self, version: int) -> Path:
        """The version's bundle, decrypted by the platform's store into a folder."""
        from kiln.store.crypto import open_artifacts
        from kiln.store.db import Database

        out = self.path.parent / f"{self.path.name}-bundle-{version}"
        if not out.exists():
            settings = self.settings()
            db = Database(settings.resolved_database_url)
            try:
                open_artifacts(settings, db).get_dir(self.bundles[version], out)
            finally:
                db.dispose()
        return out

    def settings(self, **overrides: Any) -> Any:
        from kiln.settings import Settings

        return Settings(home=self.path, **overrides)


def copy_home(template: Home, dest: Path) -> Home:
    shutil.copytree(template.path, dest)
    return Home(path=dest, admin=template.admin, keys=template.keys, bundles=template.bundles)


@contextmanager
def serve(settings: Any) -> Iterator[str]:
    """``create_app(settings)`` under uvicorn on 127.0.0.1; yields its base URL."""
    from kiln.app import create_app

    with serve_app(create_app(settings)) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}

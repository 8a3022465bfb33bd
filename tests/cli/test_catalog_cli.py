"""kiln base-models add|list|show|remove against a real server (uvicorn + a worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from kiln.cli.main import app
from store.test_catalog import make_tiny_bert

runner = CliRunner()


@pytest.fixture
def env(env: dict[str, str | None]) -> dict[str, str | None]:
    """The CLI tests' environment, with tables wider still (catalog sources are paths)."""
    return {**env, "COLUMNS": "200"}


def kiln_cli(env: dict[str, str | None], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env)


def test_add_list_show_remove(env, tmp_path, monkeypatch):
    make_tiny_bert(tmp_path / "tiny-bert")
    monkeypatch.chdir(tmp_path)  # a relative SOURCE is sent as an absolute path
    added = kiln_cli(env, "base-models", "add", "tiny", "./tiny-bert")
    assert added.exit_code == 0, added.output
    assert "base:tiny" in added.output and "model.path" in added.output

    listed = kiln_cli(env, "base-models", "list", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = [r for r in json.loads(listed.stdout) if r["name"] == "tiny"]
    assert row["source"] == str((tmp_path / "tiny-bert").resolve())
    table = kiln_cli(env, "base-models", "list")
    assert "base:tiny" in table.stdout and "hf_dir" in table.stdout

    shown = kiln_cli(env, "base-models", "show", "tiny")
    assert shown.exit_code == 0, shown.output
    assert "config.json" in shown.stdout and row["files"][0]["sha256"] in shown.stdout

    again = kiln_cli(env, "base-models", "add", "tiny", "./tiny-bert")
    assert again.exit_code == 12, again.output  # conflict

    removed = kiln_cli(env, "base-models", "remove", "tiny")
    assert removed.exit_code == 0 and "removed base:tiny" in removed.stdout
    missing = kiln_cli(env, "base-models", "show", "tiny")
    assert missing.exit_code == 6, missing.output


def test_a_project_key_cannot_add(env, platform, tmp_path):
    r = kiln_cli(env, "keys", "create", "--scope", "admin", "--project", "default", "--json")
    assert r.exit_code == 0, r.output
    project_admin = json.loads(r.stdout)["key"]
    make_tiny_bert(tmp_path / "m")
    out = kiln_cli(
        {**env, "KILN_API_KEY": project_admin}, "base-models", "add", "m", str(tmp_path / "m")
    )
    assert out.exit_code == 11, out.output  # forbidden
    assert "global admin" in out.output


def test_a_hub_id_is_refused_while_the_server_forbids_downloads(env):
    out = kiln_cli(env, "base-models", "add", "hub", "bert-base-uncased")
    assert out.exit_code == 3, out.output
    assert "KILN_ALLOW_HUB=1" in out.output


HEAVY_PROBE = """
import json, sys
from typer.testing import CliRunner
from kiln.cli.main import app
for args in (["base-models", "--help"], ["base-models", "add", "--help"]):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
heavy = ("torch", "fastapi", "sqlalchemy", "uvicorn", "httpx", "numpy", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_help_imports_no_server_or_ml_module():
    out = subprocess.run(
        [sys.executable, "-c", HEAVY_PROBE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []

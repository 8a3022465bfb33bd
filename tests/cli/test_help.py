"""Every command's ``--help`` reads like ordinary Unix help, and imports no ML module."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter so that "torch was never imported" means something: it
# walks the whole command tree, asks each command for --help and reports what is wrong.
WALK = """
import json, re, sys
import typer
from typer.testing import CliRunner
from kiln.cli.main import app

def commands(group, path):
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from commands(sub, [*path, name])

runner, problems, seen = CliRunner(), {}, []
for path, command in commands(typer.main.get_command(app), []):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    where = " ".join(["kiln", *path])
    seen.append(where)
    found = []
    if result.exit_code != 0:
        found.append(f"exit {result.exit_code}: {result.output[-300:]}")
    if "<bool>" in result.output:
        found.append("<bool>")
    found += re.findall(r"\\{[^{}]*\\}", result.output)
    usage = next((l for l in result.output.splitlines() if "Usage:" in l), "")
    if not usage.split("Usage:")[-1].strip().startswith(where):
        found.append(f"usage line {usage.strip()!r}")
    if found:
        problems[where] = found
print(json.dumps({"seen": seen, "problems": problems, "torch": "torch" in sys.modules}))
"""


def test_every_help_is_plain_unix_help_and_imports_no_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", WALK], capture_output=True, text=True, check=True, timeout=300
    )
    report = json.loads(out.stdout)
    # the walk reached the groups and their commands, not just the top level
    assert {"kiln", "kiln train", "kiln jobs", "kiln jobs submit", "kiln quotas set"} <= set(
        report["seen"]
    )
    assert len(report["seen"]) > 40
    assert report["problems"] == {}
    assert report["torch"] is False


def test_usage_lines_name_arguments_as_click_did() -> None:
    from typer.testing import CliRunner

    from kiln.cli.main import app

    runner = CliRunner()
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "Usage: kiln train [OPTIONS] SPEC" in train.output
    predict = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert "Usage: kiln predict [OPTIONS] BUNDLE INPUT" in predict.output
    group = runner.invoke(app, ["jobs", "--help"], env={"COLUMNS": "200"})
    assert "Usage: kiln jobs [OPTIONS] COMMAND [ARGS]..." in group.output
    # --help is a flag like our own: no value type after it
    help_row = next(line for line in train.output.splitlines() if "--help" in line)
    assert help_row.split("--help")[1].split()[0] == "Show"

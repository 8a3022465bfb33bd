"""Run README.md's ```bash blocks in order, as a newcomer pasting them would.

The blocks run in one bash session (``set -euo pipefail``), so a variable one block sets
(``KEY=$(kiln keys create ... --json | jq -r .key)``) is there for the next. The session
starts in a fresh folder holding a copy of ``examples/`` and the files ``make`` needs,
with ``.venv`` linked to the repository's virtual environment (``.venv/bin`` first on
``PATH``), ``HOME`` in that folder and ``KILN_HOME=$HOME/.kiln``, so ``~/.kiln`` in the
README is the fresh one. The README's ``127.0.0.1:8080`` is rewritten to a free port (and
``kiln up`` given ``--port``) so the check can run beside another server.

An HTML comment right before a block (blank lines between are allowed) tells the check
how to treat it; rendered Markdown does not show it:

- ``<!-- readme-check: skip REASON -->``: the block is not run (an install step, the test
  suite itself, a PostgreSQL or S3 server, a run of minutes). The reason is required.
- ``<!-- readme-check: background -->``: each command of the block starts in the
  background (``kiln up``), and the check waits until ``/healthz`` answers before the
  next block; the processes are stopped (SIGINT, as Ctrl-C) when the README ends.
- ``<!-- readme-check: skip-line TEXT -- REASON -->``: inside the block, a command line
  starting with TEXT is not run (repeat the comment for more).

A failure names the block (its first line in README.md) and the README line of the
command that failed, with the tail of the session's output.

Run it alone with ``.venv/bin/python tests/docs/readme_check.py``; pytest runs it through
``tests/docs/test_readme.py`` (marked ``e2e``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# What the README's commands read besides examples/: make's targets and their inputs.
COPIED = ("examples", "Makefile", "requirements.lock", "pyproject.toml")
DIRECTIVE = re.compile(r"^<!--\s*readme-check:\s*(?P<body>.*?)\s*-->\s*$")
README_HOST = "127.0.0.1:8080"
INSTALLED = ".readme-check-installed"  # make's install stamp in the copy (see _environment)


class ReadmeError(AssertionError):
    """The README cannot be checked as written (a bad directive), or a block failed."""


@dataclass
class Block:
    """One ```bash block: where it starts in README.md, its lines, how to run it."""

    start: int  # README line of the first line inside the fence (1-based)
    lines: list[str]
    mode: str = "run"  # run | background | skip
    reason: str = ""
    skipped_lines: list[tuple[str, str]] = field(default_factory=list)  # (prefix, reason)

    def commands(self) -> list[tuple[int, str]]:
        """(README line, command text) for each command: continuation lines joined."""
        out: list[tuple[int, str]] = []
        pending: list[str] = []
        first = 0
        for offset, line in enumerate(self.lines):
            if not pending:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                first = self.start + offset
            pending.append(line)
            if not line.rstrip().endswith("\\") and _complete("\n".join(pending)):
                out.append((first, "\n".join(pending)))
                pending = []
        if pending:
            raise ReadmeError(f"README.md:{first}: a command is never completed")
        return out

    def skip_reason(self, command: str) -> str | None:
        """Why a command of this block is not run (a skip-line directive), or None."""
        for prefix, reason in self.skipped_lines:
            if command.lstrip().startswith(prefix):
                return reason
        return None


def _complete(command: str) -> bool:
    """Whether bash reads ``command`` as whole (no open quote, ``$(``, ``if`` …)."""
    return (
        subprocess.run(["bash", "-n"], input=command, text=True, capture_output=True).returncode
        == 0
    )


def parse(text: str) -> list[Block]:
    """The README's ```bash blocks with the directives before each; others are ignored."""
    blocks: list[Block] = []
    directives: list[tuple[int, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := DIRECTIVE.match(line.strip()):
            directives.append((index + 1, match["body"]))
        elif line.strip() == "```bash":
            end = _fence_end(lines, index)
            block = Block(start=index + 2, lines=lines[index + 1 : end])
            for number, body in directives:
                _apply(block, number, body)
            blocks.append(block)
            directives = []
            index = end
        elif line.strip() and directives:
            number = directives[0][0]
            raise ReadmeError(f"README.md:{number}: a readme-check comment not before a bash block")
        index += 1
    return blocks


def _fence_end(lines: list[str], opening: int) -> int:
    """Index of the fence closing the block opened at ``opening``."""
    for index in range(opening + 1, len(lines)):
        if lines[index].strip() == "```":
            return index
    raise ReadmeError(f"README.md:{opening + 1}: a ```bash block is never closed")


def _apply(block: Block, number: int, body: str) -> None:
    """Set a block's mode from one directive's text; an unknown one is an error."""
    word, _, rest = body.partition(" ")
    if word == "skip" and rest.strip():
        block.mode, block.reason = "skip", rest.strip()
    elif word == "background" and not rest.strip():
        block.mode = "background"
    elif word == "skip-line" and " -- " in rest:
        prefix, reason = rest.split(" -- ", 1)
        block.skipped_lines.append((prefix.strip(), reason.strip()))
    else:
        raise ReadmeError(
            f"README.md:{number}: readme-check directive {body!r}: expected 'skip REASON', "
            "'background' or 'skip-line TEXT -- REASON'"
        )


def script(blocks: list[Block], port: int, status: Path) -> str:
    """The bash session: every runnable command, each preceded by its README line."""
    out = [
        "set -euo pipefail",
        f"trap 'echo \"$README_LINE\" > {shlex.quote(str(status))}' ERR",
        "README_LINE=0",
        "BACKGROUND_PIDS=()",
    ]
    for block in blocks:
        if block.mode == "skip":
            continue
        out.append(f"echo '--- README.md:{block.start} ({block.mode})'")
        for number, command in block.commands():
            if block.skip_reason(command) is not None:
                continue
            command = _localize(command, port)
            out.append(f"README_LINE={number}")
            if block.mode == "background":
                out.append(f"( {command}\n) > background-{number}.log 2>&1 &")
                out.append("BACKGROUND_PIDS+=($!)")
            else:
                out.append(command)
        if block.mode == "background":
            out.append(_wait_healthy(port))
    out.append("README_LINE=end")
    return "\n".join(out) + "\n"


def _localize(command: str, port: int) -> str:
    """The README's address rewritten to this run's port; ``kiln up`` told to bind it."""
    command = command.replace(README_HOST, f"127.0.0.1:{port}")
    return re.sub(r"^(\s*kiln up\b)", rf"\1 --port {port}", command)


def _wait_healthy(port: int) -> str:
    """Bash that waits (up to 120 s) until the background server answers /healthz."""
    return (
        "for _ in $(seq 600); do "
        f"curl -sf http://127.0.0.1:{port}/healthz >/dev/null && break; sleep 0.2; done\n"
        f"curl -sf http://127.0.0.1:{port}/healthz >/dev/null"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _workdir(root: Path) -> Path:
    """A fresh folder with what the README's commands read, the venv linked in."""
    work = root / "work"
    work.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("digits-images"))
        else:
            shutil.copy2(source, work / name)  # mtimes kept: make sees the venv up to date
    (work / ".venv").symlink_to(REPO / ".venv")
    (work / INSTALLED).touch()  # newer than the copies: make takes the venv as installed
    (root / "home").mkdir()
    return work


def _environment(root: Path, port: int) -> dict[str, str]:
    """The caller's environment minus kiln's, with a fresh HOME and KILN_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    home = root / "home"
    env.update(
        HOME=str(home),
        KILN_HOME=str(home / ".kiln"),
        KILN_URL=f"http://127.0.0.1:{port}",
        PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    # As in tests/conftest.py: the README's tiny models train fastest on one thread, and
    # far faster so on a busy machine. A caller's own setting wins.
    env.setdefault("OMP_NUM_THREADS", "1")
    # .venv is the repository's own, linked in: make must never reinstall it from this
    # copy (that would point its editable install here), so its install stamp is one the
    # check makes after copying (a command-line variable, passed down in MAKEFLAGS).
    env["MAKEFLAGS"] = f"STAMP={INSTALLED}"
    env.pop("VIRTUAL_ENV", None)
    return env


def run(readme: Path = README, timeout: float = 900.0, echo: bool = False) -> str:
    """Run the README's blocks; the session's output, or :class:`ReadmeError` naming the line.

    With ``echo``, the session's output is also printed as it comes.
    """
    blocks = parse(readme.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="readme-check-") as tmp:
        root = Path(tmp)
        work, port, status = _workdir(root), _free_port(), root / "failed-line"
        text = script(blocks, port, status) + _stop_background()
        (root / "readme.sh").write_text(text, encoding="utf-8")
        process = subprocess.Popen(
            ["bash", str(root / "readme.sh")],
            cwd=work,
            env=_environment(root, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so a failure can stop kiln up and its workers too
        )
        # The watchdog ends the whole session past the deadline; reading goes on until then.
        watchdog = threading.Timer(timeout, _kill_group, [process])
        watchdog.start()
        try:
            output = _read(process, echo)
        finally:
            timed_out = not watchdog.is_alive() and process.returncode != 0
            watchdog.cancel()
            _kill_group(process)
        if timed_out:
            raise ReadmeError(f"the README took over {timeout:g} s\n{_tail(output)}")
        if process.returncode != 0:
            line = status.read_text().strip() if status.exists() else "?"
            raise ReadmeError(_failure(readme, blocks, line, output, work))
        return output


def _read(process: subprocess.Popen[str], echo: bool) -> str:
    """Everything the session prints, until it exits (printed too, with ``echo``)."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
    process.wait()
    return "".join(lines)


def _stop_background() -> str:
    """Bash run after the last block: Ctrl-C to each background process, then wait.

    As Ctrl-C in a terminal does, SIGINT goes to the process and its children (``kiln up``
    and its workers): the workers drain and the server stops.
    """
    return (
        'for pid in "${BACKGROUND_PIDS[@]}"; do\n'
        '  kill -INT "$pid" 2>/dev/null || true; pkill -INT -P "$pid" || true\n'
        "done\n"
        'for pid in "${BACKGROUND_PIDS[@]}"; do wait "$pid" || true; done\n'
    )


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Stop whatever the session left running (its own process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _failure(readme: Path, blocks: list[Block], line: str, output: str, work: Path) -> str:
    """The message for a failed session: the block, the README line and command, the tail."""
    where = f"README.md:{line}"
    if line.isdigit():
        number = int(line)
        block = max((b for b in blocks if b.start <= number), key=lambda b: b.start)
        command = dict(block.commands()).get(number, "")
        where = f"block at README.md:{block.start}, command at README.md:{number}: {command}"
    logs = "".join(
        f"\n--- {log.name}\n{_tail(log.read_text(errors='replace'), 3000)}"
        for log in sorted(work.glob("background-*.log"))
    )
    return f"README command failed: {where}\n--- output\n{_tail(output)}{logs}"


def _tail(text: str, size: int = 6000) -> str:
    return text if len(text) <= size else "…" + text[-size:]


def summary(blocks: list[Block]) -> str:
    """One line per block: where it is, how it runs, and why it (or a line) is skipped."""
    rows = []
    for block in blocks:
        row = f"README.md:{block.start}: {block.mode}"
        if block.reason:
            row += f" ({block.reason})"
        for prefix, reason in block.skipped_lines:
            row += f"; skips '{prefix}' ({reason})"
        rows.append(row)
    return "\n".join(rows)


if __name__ == "__main__":
    started = time.monotonic()
    print(summary(parse(README.read_text(encoding="utf-8"))))
    try:
        run(echo=True)
    except ReadmeError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    print(f"README check passed in {time.monotonic() - started:.0f} s")

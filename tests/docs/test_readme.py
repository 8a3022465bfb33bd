"""README.md works as written: its bash blocks run in order in a fresh KILN_HOME.

The end-to-end test runs the whole README (``kiln up`` in the background included; see
``readme_check.py`` for the directives that mark background and skipped blocks). The
fast tests check the checker itself: how it reads blocks and directives, and that a
failing command is reported with its README line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from readme_check import README, Block, ReadmeError, parse, run, summary


@pytest.mark.e2e
def test_every_readme_bash_block_runs_in_order() -> None:
    output = run(timeout=900)
    assert "README_LINE" not in output  # the session's bookkeeping stays out of its output


def test_the_readme_has_runnable_blocks_and_every_skip_says_why() -> None:
    blocks = parse(README.read_text(encoding="utf-8"))
    modes = {block.mode for block in blocks}
    assert {"run", "background", "skip"} <= modes, summary(blocks)
    assert all(block.reason for block in blocks if block.mode == "skip")
    assert all(reason for block in blocks for _, reason in block.skipped_lines)


def test_parse_reads_directives_and_joins_continuations() -> None:
    text = "\n".join(
        [
            "# title",
            "<!-- readme-check: skip needs a GPU -->",
            "```bash",
            "nvidia-smi",
            "```",
            "```bash",
            "# a comment line",
            "echo one \\",
            "  two",
            "echo three",
            "```",
            "<!-- readme-check: background -->",
            "",
            "```bash",
            "kiln up",
            "```",
        ]
    )
    skipped, plain, background = parse(text)
    assert (skipped.mode, skipped.reason) == ("skip", "needs a GPU")
    assert plain.commands() == [(8, "echo one \\\n  two"), (10, "echo three")]
    assert background.mode == "background"


@pytest.mark.parametrize(
    "directive",
    ["skip", "background now", "skip-line make test", "run fast"],
)
def test_a_directive_without_its_reason_or_unknown_is_refused(directive: str) -> None:
    with pytest.raises(ReadmeError, match=r"README\.md:1"):
        parse(f"<!-- readme-check: {directive} -->\n```bash\ntrue\n```\n")


def test_a_directive_not_followed_by_a_bash_block_is_refused() -> None:
    with pytest.raises(ReadmeError, match="not before a bash block"):
        parse("<!-- readme-check: skip no reason needed -->\nsome prose\n```bash\ntrue\n```\n")


def test_skip_line_skips_only_the_command_it_names() -> None:
    (block,) = parse(
        "<!-- readme-check: skip-line make test -- runs the suite -->\n"
        "```bash\nmake quickstart\nmake test\n```\n"
    )
    assert [block.skip_reason(command) for _, command in block.commands()] == [
        None,
        "runs the suite",
    ]


def test_a_failing_command_is_named_with_its_readme_line(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text('intro\n```bash\nGREETING=hello\ntest "$GREETING" = bye\necho after\n```\n')
    with pytest.raises(ReadmeError) as error:
        run(readme, timeout=60)
    assert 'command at README.md:4: test "$GREETING" = bye' in str(error.value)
    assert "block at README.md:3" in str(error.value)


def test_blocks_share_one_session(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text('```bash\nNAME=$(echo kiln)\n```\ntext\n```bash\necho "hi $NAME"\n```\n')
    assert "hi kiln" in run(readme, timeout=60)


def test_block_dataclass_refuses_a_dangling_continuation() -> None:
    with pytest.raises(ReadmeError, match="never completed"):
        Block(start=1, lines=["echo \\"]).commands()

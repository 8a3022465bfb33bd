"""Reading generation data (chat / completion / text): formats, line numbers, bounds."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from kiln.data import dialogs
from kiln.data.dialogs import Message, infer_format, parse_example, read_corpus
from kiln.errors import DataError, NotFoundError


def chat(*turns: tuple[str, str]) -> dict[str, object]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


CHAT = chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_chat_lines_are_read_with_their_line_numbers(tmp_path):
    second = chat(("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6"))
    second["messages"][0]["name"] = "alice"  # accepted, not kept
    src = write_lines(tmp_path / "c.jsonl", [json.dumps(CHAT), "", "   ", json.dumps(second)])
    corpus = read_corpus(src)
    assert corpus.format == "chat"
    assert corpus.source == src
    assert [e.line for e in corpus.examples] == [1, 4]  # blank lines skipped, still counted
    assert corpus.examples[0].messages == (
        Message(role="system", content="be brief"),
        Message(role="user", content="hi"),
        Message(role="assistant", content="hello"),
    )
    assert [m.content for m in corpus.examples[1].messages or ()] == ["2+2?", "4", "and 3+3?", "6"]
    assert corpus.fingerprint.startswith("sha256:")


def test_completion_and_text_are_inferred(tmp_path):
    comp = write_lines(
        tmp_path / "p.jsonl", [json.dumps({"prompt": "Q: 1+1\nA:", "completion": " 2"})]
    )
    got = read_corpus(comp)
    assert got.format == "completion"
    assert (got.examples[0].prompt, got.examples[0].completion) == ("Q: 1+1\nA:", " 2")
    text = write_lines(tmp_path / "t.jsonl", [json.dumps({"body": "once upon a time", "id": 3})])
    got = read_corpus(text, text_column="body")
    assert got.format == "text"
    assert got.examples[0].text == "once upon a time"


def test_infer_format():
    assert infer_format({"messages": []}) == "chat"
    assert infer_format({"prompt": "a", "completion": "b"}) == "completion"
    assert infer_format({"prompt": "a"}) == "text"
    assert infer_format({"text": "a"}) == "text"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_text_and_completion_tables(tmp_path, suffix):
    frame = pd.DataFrame({"story": ["a cat", "a dog"], "n": [1, 2]})
    path = tmp_path / f"t{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    got = read_corpus(str(path), text_column="story")
    assert got.format == "text"
    assert [(e.line, e.text) for e in got.examples] == [(1, "a cat"), (2, "a dog")]
    pairs = pd.DataFrame({"prompt": ["x =", "y ="], "completion": [" 1", " 2"]})
    path = tmp_path / f"p{suffix}"
    pairs.to_csv(path, index=False) if suffix == ".csv" else pairs.to_parquet(path)
    got = read_corpus(str(path))
    assert got.format == "completion"
    assert [e.completion for e in got.examples] == [" 1", " 2"]


def test_table_with_a_missing_text_names_its_row(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["fine", None, "also"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"t\.csv, row 2: the text in 'text' is empty"):
        read_corpus(str(path))
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["fine", None, "also"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"t\.parquet, row 2: 'text' is missing \(null\)"):
        read_corpus(str(path))


def test_chat_table_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"messages": ["[]"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="chat data must be JSON lines"):
        read_corpus(str(path), fmt="chat")


def test_gzip_and_fsspec_uri(tmp_path):
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(CHAT) + "\n")
    assert read_corpus(str(gz)).examples[0].messages is not None
    with fsspec.open("memory://kiln-test/c.jsonl", "w") as fh:
        fh.write(json.dumps(CHAT) + "\n")
    got = read_corpus("memory://kiln-test/c.jsonl")
    assert got.format == "chat" and len(got.examples) == 1


def test_fingerprint_is_content_not_path(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps(CHAT)])
    # other path, blank lines, key order and spacing: same content
    reordered = {
        "messages": [{"content": m["content"], "role": m["role"]} for m in CHAT["messages"]]
    }  # type: ignore[attr-defined]
    b = write_lines(
        tmp_path / "b.jsonl", ["", json.dumps(reordered, indent=None, separators=(", ", ": "))]
    )
    other = chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello!"))
    c = write_lines(tmp_path / "c.jsonl", [json.dumps(other)])
    assert read_corpus(a).fingerprint == read_corpus(b).fingerprint
    assert read_corpus(a).fingerprint != read_corpus(c).fingerprint


GOOD = json.dumps(CHAT)
BAD_INPUTS = [
    ([GOOD, "{not json"], 2, "invalid JSON"),
    ([GOOD, "[1, 2]"], 2, "expected a JSON object, not list"),
    (['"just a string"'], 1, "expected a JSON object, not str"),
    ([GOOD, json.dumps({"prompt": "a", "completion": "b"})], 2, "missing key 'messages'"),
    ([json.dumps(chat(("tool", "x"), ("assistant", "y")))], 1, "message 1: unknown role 'tool'"),
    (
        [json.dumps({"messages": [{"role": "user", "content": ["a"]}]})],
        1,
        "'content' must be a string",
    ),
    ([json.dumps({"messages": [{"role": "user"}]})], 1, "message 1: missing key 'content'"),
    (
        [GOOD, json.dumps(chat(("user", "hi"), ("assistant", "  ")))],
        2,
        "the assistant turn is empty",
    ),
    ([json.dumps(chat(("system", "s"), ("user", "hi")))], 1, "no assistant turn"),
    ([json.dumps({"messages": []})], 1, "'messages' is empty"),
    ([json.dumps({"messages": "hi"})], 1, "'messages' must be a list"),
    (
        [json.dumps({"messages": [{"role": "assistant", "content": "a", "weight": 0}]})],
        1,
        "unsupported key(s) ['weight']",
    ),
    ([json.dumps({"prompt": "a", "completion": ""})], 1, "the completion is empty"),
    ([json.dumps({"prompt": 3, "completion": "b"})], 1, "'prompt' must be a string"),
    ([json.dumps({"prompt": "a", "completion": None})], 1, "'completion' is missing (null)"),
    ([json.dumps({"body": "x"})], 1, "missing key 'text'"),
    ([json.dumps({"text": ""})], 1, "the text in 'text' is empty"),
]


@pytest.mark.parametrize(("lines", "line", "fragment"), BAD_INPUTS)
def test_bad_input_names_file_and_line(tmp_path, lines, line, fragment):
    src = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_corpus(src)
    assert info.value.field == "data.source"
    assert f"bad.jsonl, line {line}" in info.value.message
    assert fragment in info.value.message


def test_explicit_format_is_enforced(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"line 1: missing key 'prompt' \(format completion"):
        read_corpus(src, fmt="completion")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"e\.jsonl holds no examples"):
        read_corpus(str(path))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl, line 2: not valid UTF-8"):
        read_corpus(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert read_corpus(str(path)).format == "chat"


def test_line_over_one_mib_is_refused(tmp_path):
    long = json.dumps({"text": "x" * (1 << 20)})
    src = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": "short"}), long])
    with pytest.raises(DataError, match=r"long\.jsonl, line 2: longer than 1 MiB"):
        read_corpus(src)


def test_line_of_exactly_the_limit_is_read(tmp_path):
    body = json.dumps({"text": ""})[:-2]  # '{"text": "'
    line = body + "y" * (dialogs.MAX_LINE_BYTES - len(body) - 2) + '"}'
    assert len(line.encode()) == dialogs.MAX_LINE_BYTES
    src = write_lines(tmp_path / "edge.jsonl", [line])
    assert len(read_corpus(src).examples[0].text or "") == dialogs.MAX_LINE_BYTES - len(body) - 2


def test_example_and_file_caps(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "many.jsonl", [json.dumps({"text": f"t{i}"}) for i in range(5)])
    monkeypatch.setattr(dialogs, "MAX_EXAMPLES", 4)
    with pytest.raises(DataError, match="more than 4 examples"):
        read_corpus(src)
    monkeypatch.setattr(dialogs, "MAX_EXAMPLES", 5)
    assert len(read_corpus(src).examples) == 5
    monkeypatch.setattr(dialogs, "MAX_FILE_BYTES", 40)
    with pytest.raises(DataError, match=r"over the 0 MiB limit"):
        read_corpus(src)


def test_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match=r"absent\.jsonl"):
        read_corpus(str(tmp_path / "absent.jsonl"))


def test_parse_example_directly():
    got = parse_example({"prompt": "", "completion": "x"}, 7, "completion")
    assert (got.line, got.prompt, got.completion) == (7, "", "x")
    with pytest.raises(DataError, match=r"^line 9: missing key 'messages'"):
        parse_example({}, 9, "chat")

"""onnxruntime-genai: building a folder from a tiny HF Llama and generating on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from kiln.errors import BundleError, ExportError
from kiln.runtime.genai import GenaiGenerator, build_genai
from kiln.runtime.generation import SamplingParams, TorchGenerator

from .test_generation import tiny_llama, tiny_tokenizer

pytest.importorskip("onnxruntime_genai")

EOS_ONLY = (1,)  # the tokenizer's (and the folder's) eos id: nothing else ends a sequence


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def torch_gen(tok: PreTrainedTokenizerFast) -> TorchGenerator:
    return TorchGenerator(tiny_llama(tok), tok)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, torch_gen: TorchGenerator) -> Path:
    out = tmp_path_factory.mktemp("hf")
    torch_gen.model.save_pretrained(out)
    torch_gen.tokenizer.save_pretrained(out)
    return out


def build(hf_dir: Path, tmp: pytest.TempPathFactory, precision: str) -> Path:
    out = tmp.mktemp(f"genai-{precision}") / "genai"
    build_genai(hf_dir, out, precision=precision)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def fp32(
    hf_dir: Path, tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast
) -> GenaiGenerator:
    return GenaiGenerator(build(hf_dir, tmp_path_factory, "fp32"), tok)


def prompts(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    return [list(tok(t)["input_ids"]) for t in ("the quick brown fox", "hello", "a b c d e")]


def test_build_writes_only_the_model_folder(fp32: GenaiGenerator) -> None:
    names = {p.name for p in fp32.folder.iterdir()}
    assert {"genai_config.json", "model.onnx"} <= names
    assert all(p.is_file() for p in fp32.folder.iterdir())  # no cache directory inside
    assert fp32.name == "onnxruntime-genai"


def test_fp32_greedy_equals_torch(
    fp32: GenaiGenerator, torch_gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    # the folder's eos (the tokenizer's here) always ends an og sequence: keep it
    params = SamplingParams(max_new_tokens=20)
    rows = prompts(tok)
    want = torch_gen.generate(rows, params)
    singles = [fp32.generate([r], params)[0] for r in rows]
    batch = fp32.generate(rows, params)  # the Engine path
    assert [c.token_ids for c in singles] == [c.token_ids for c in want]
    assert [c.token_ids for c in batch] == [c.token_ids for c in want]
    assert [c.text for c in batch] == [c.text for c in want]
    assert [c.finish_reason for c in batch] == [c.finish_reason for c in want]
    assert any(c.finish_reason == "stop" for c in batch)  # eos seen: the stop path ran
    assert any(c.finish_reason == "length" and c.completion_tokens == 20 for c in batch)


def test_stop_string_and_eos_as_torch(
    fp32: GenaiGenerator, torch_gen: TorchGenerator, tok: PreTrainedTokenizerFast
) -> None:
    rows = prompts(tok)
    full = torch_gen.generate(rows[:1], SamplingParams(max_new_tokens=24, eos_ids=EOS_ONLY))[0]
    stop = full.text[len(full.text) // 2 :][:2]
    params = SamplingParams(max_new_tokens=24, eos_ids=(full.token_ids[5], *EOS_ONLY), stop=(stop,))
    stream = fp32.stream(rows[0], params)
    deltas = list(stream)
    want = torch_gen.generate(rows[:1], params)[0]
    assert stream.completion.text == want.text
    assert stream.completion.token_ids == want.token_ids
    assert stream.completion.finish_reason == "stop"
    assert "".join(deltas) == want.text
    assert all(stop not in d for d in deltas)
    # the same rules stop each request of an Engine batch
    batch = fp32.generate(rows, params)
    assert [c.token_ids for c in batch] == [c.token_ids for c in torch_gen.generate(rows, params)]


def test_seeded_sampling_reproducible(fp32: GenaiGenerator, tok: PreTrainedTokenizerFast) -> None:
    rows = prompts(tok)

    def sample(seed: int) -> list[list[int]]:
        params = SamplingParams(
            max_new_tokens=16, temperature=1.2, top_p=0.9, seed=seed, eos_ids=EOS_ONLY
        )
        return [c.token_ids for c in fp32.generate(rows, params)]

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_early_close(fp32: GenaiGenerator, tok: PreTrainedTokenizerFast) -> None:
    stream = fp32.stream(prompts(tok)[0], SamplingParams(max_new_tokens=50, eos_ids=EOS_ONLY))
    assert next(stream)
    stream.close()
    assert list(stream) == []
    with pytest.raises(RuntimeError):
        _ = stream.completion


def test_context_length_bounds_generation(
    fp32: GenaiGenerator, tok: PreTrainedTokenizerFast
) -> None:
    row = prompts(tok)[0]
    room = fp32.context_length - len(row)
    done = fp32.generate([row], SamplingParams(max_new_tokens=room + 50, eos_ids=EOS_ONLY))[0]
    assert done.finish_reason == "length" and done.completion_tokens == room


def test_int4_builds_and_generates(
    hf_dir: Path, tmp_path_factory: pytest.TempPathFactory, tok: PreTrainedTokenizerFast
) -> None:
    folder = build(hf_dir, tmp_path_factory, "int4")
    assert "MatMulNBits" in (folder / "model.onnx").read_bytes().decode("latin-1")
    gen = GenaiGenerator(folder, tok)
    done = gen.generate(prompts(tok)[:1], SamplingParams(max_new_tokens=8, eos_ids=EOS_ONLY))[0]
    assert done.completion_tokens == 8 and done.finish_reason == "length"


def test_errors_name_the_input(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ExportError, match=r"config\.json"):
        build_genai(tmp_path, tmp_path / "out", precision="fp32")
    with pytest.raises(BundleError, match=r"genai_config\.json"):
        GenaiGenerator(tmp_path, tok)


def _copy_folder(fp32: GenaiGenerator, tmp_path: Path) -> Path:
    folder = tmp_path / "genai"
    shutil.copytree(fp32.folder, folder)
    return folder


def test_a_folder_with_a_library_is_refused_before_loading(
    fp32: GenaiGenerator, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """onnxruntime-genai loads a custom-ops library named in the config from inside the
    folder: a bundle must never get that far."""
    folder = _copy_folder(fp32, tmp_path)
    (folder / "ops.so").write_bytes(b"\x7fELF")
    with pytest.raises(BundleError, match=r"ops\.so"):
        GenaiGenerator(folder, tok)
    (folder / "ops.so").unlink()
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = "model.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="custom_ops_library"):
        GenaiGenerator(folder, tok)


def test_a_filename_outside_the_folder_is_refused(
    fp32: GenaiGenerator, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    folder = _copy_folder(fp32, tmp_path)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "../model.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="must name a file in the folder"):
        GenaiGenerator(folder, tok)


def test_a_link_in_the_folder_is_refused(
    fp32: GenaiGenerator, tok: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    folder = _copy_folder(fp32, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (folder / "model.onnx").rename(outside)
    (folder / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="no links"):
        GenaiGenerator(folder, tok)


@pytest.mark.parametrize(
    "option",
    [{"enable_profiling": "/tmp/kiln-profile"}, {"provider_options": [{"cuda": {}}]}],
)
def test_session_options_that_touch_files_are_refused(
    fp32: GenaiGenerator, tok: PreTrainedTokenizerFast, tmp_path: Path, option: dict[str, object]
) -> None:
    """enable_profiling makes onnxruntime write a file where it says: only options that
    read and write nothing pass."""
    folder = _copy_folder(fp32, tmp_path)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"].update(option)
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="not allowed"):
        GenaiGenerator(folder, tok)

"""Helpers many tests share: waiting on a condition, free ports, real processes and servers.

Import it as ``from support import ...`` (``tests/`` is on ``sys.path``, as for
``servers``). Only the standard library loads at module level; httpx and uvicorn load
inside the functions that use them, so collecting tests stays cheap.

- :func:`wait_for` polls a condition until it holds, or fails naming what it waited for;
  :func:`async_wait_for` does the same inside an event loop.
- :func:`free_port` is a TCP port on 127.0.0.1 that nothing listens on.
- :func:`kiln_env`, :func:`start_process`, :func:`stop_process` and :func:`wait_for_http`
  run a child process (``kiln up``, ``kiln serve``, a worker) and talk to it.
- :func:`serve_app` runs an ASGI app under uvicorn in a thread of the test process.
- :func:`offline_json` runs a Python script in a fresh offline process; its JSON answer.
- :func:`write_chats` and :func:`gpt_spec` are a tiny chat corpus and a tiny gpt spec;
  :func:`tiny_bpe` and :func:`tiny_llama` a tiny byte-level BPE tokenizer and a tiny
  random Llama on it (torch, transformers and tokenizers load when they are called).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from time import monotonic, sleep
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "the condition",
) -> T:
    """Call ``condition`` every ``interval`` s until it returns something truthy; that value.

    It is called at least once, the last time after the deadline. After ``timeout`` s an
    :class:`AssertionError` says what was awaited; an exception from ``condition``
    (an assertion that the awaited thing can no longer happen) ends the wait at once.
    """
    deadline = monotonic() + timeout
    while True:
        if value := condition():
            return value
        if monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        sleep(interval)


async def async_wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.01,
    what: str = "the condition",
) -> T:
    """:func:`wait_for` inside an event loop: the loop runs other tasks between calls."""
    deadline = monotonic() + timeout
    while True:
        if value := condition():
            return value
        if monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just handed out and nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- child processes ------------------------------------------------------------------


def kiln_env(home: Path | None = None, **env: str) -> dict[str, str]:
    """This process's environment without any ``KILN_*`` setting, plus ``KILN_HOME`` and ``env``.

    The developer's own kiln settings never leak into a child the test starts.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    if home is not None:
        clean["KILN_HOME"] = str(home)
    return {**clean, **env}


def start_process(
    args: Sequence[str], log: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """``args`` as a child process with ``env``; its stdout and stderr both go to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT)


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 60.0
) -> int:
    """Send ``sig`` unless ``proc`` has exited, and wait for it; its exit code.

    A process still running ``timeout`` s later is killed (so no test leaves one behind)
    and the test fails saying so.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        name = signal.Signals(sig).name
        raise AssertionError(
            f"pid {proc.pid} did not exit within {timeout:g} s of {name}"
        ) from None


def wait_for_http(
    url: str,
    *,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
) -> None:
    """Wait until ``GET url`` answers 200 (a server's ``/healthz`` or ``/readyz``).

    With ``proc``, its exit fails the wait at once, showing ``log`` (its output).
    """
    import httpx

    def answered() -> bool:
        if proc is not None and proc.poll() is not None:
            output = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise AssertionError(f"pid {proc.pid} exited with {proc.returncode}:\n{output}")
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answered, timeout=timeout, interval=0.1, what=f"{url} to answer 200")


# --- servers in this process ------------------------------------------------------------


@contextmanager
def serve_app(app: Any, *, timeout: float = 60.0) -> Iterator[str]:
    """``app`` under uvicorn (lifespan on) in a thread, on a port the OS picks; its base URL.

    The socket is bound before the thread starts, so the port cannot be taken in between.
    On exit the server stops and the test fails if it does not within 30 s.
    """
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def started() -> bool:
        assert thread.is_alive(), "uvicorn exited while starting"
        return bool(server.started)

    try:
        wait_for(started, timeout=timeout, interval=0.01, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def offline_json(script: str, *args: str, timeout: float = 120.0) -> Any:
    """Run ``python -c script args...`` in a fresh process with the hub offline and one
    OpenMP thread; the JSON document on the last line of its stdout. A non-zero exit
    fails with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- language models: a tiny chat corpus, gpt spec, tokenizer and Llama -------------

COLORS = ["red", "blue", "green", "black", "white", "pink"]
THINGS = ["mug", "lamp", "chair", "pen", "kite", "sock"]


def write_chats(path: Path, n: int = 48) -> Path:
    """``n`` short chats: the answer is the colour named in the question."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            color, thing = COLORS[i % len(COLORS)], THINGS[(i // len(COLORS)) % len(THINGS)]
            chat = {
                "messages": [
                    {"role": "system", "content": "Answer with the colour only."},
                    {"role": "user", "content": f"I want a {color} {thing}. Which colour?"},
                    {"role": "assistant", "content": color},
                ]
            }
            fh.write(json.dumps(chat) + "\n")
    return path


def gpt_spec(data: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "tiny-gpt",
        "task": "generation",
        "data": {"source": str(data), "split": {"val": 0.2, "test": 0.1, "seed": 0}},
        "model": {
            "type": "gpt",
            "layers": 2,
            "heads": 2,
            "dim": 32,
            "max_length": 64,
            "vocab_size": 300,
        },
        "train": {
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "batch_size": 8,
            "epochs": 3,
            **train,
        },
    }


TINY_TEXTS = (
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "hello world, hello kiln 123",
)


def tiny_bpe(texts: Sequence[str] = TINY_TEXTS * 10, vocab: int = 300) -> PreTrainedTokenizerFast:
    """kiln's byte-level BPE tokenizer (:func:`kiln.data.bpe.train_bpe_tokenizer`: pad id
    0, eos = bos id 1, the chat markers, kiln's chat template) learnt from ``texts``."""
    from kiln.data.bpe import train_bpe_tokenizer

    return train_bpe_tokenizer(list(texts), vocab)


def tiny_llama(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> LlamaForCausalLM:
    """A random Llama in eval mode, seeded (``torch.manual_seed(0)``): hidden 32, MLP 64,
    2 layers, 4 heads over 2 key/value heads (grouped-query), 128 positions, tied
    embeddings, ``tokenizer``'s vocabulary size and pad/bos/eos ids. ``overrides`` are
    further ``LlamaConfig`` fields (they win)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))
    model.train(False)  # eval mode (``eval()`` is untyped in transformers' stubs)
    return model

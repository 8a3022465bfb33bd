"""``kiln generate``, ``kiln chat`` and ``kiln import``: language-model bundles.

``generate`` streams one answer to stdout as it is decoded; ``chat`` is a REPL that
keeps the conversation (``/reset`` clears it, Ctrl-D or ``/exit`` leaves); ``import``
turns a pretrained model into a bundle without training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kiln.cli.errors import reports_errors
from kiln.cli.options import JsonOut, flag
from kiln.cli.render import console, err_console, print_json

if TYPE_CHECKING:
    from kiln.data.dialogs import Message
    from kiln.lm_bundle import LMBundle, Sampling

BundleArg = Annotated[Path, typer.Argument(help="Generation bundle directory.", show_default=False)]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="A system message.")]
MaxTokens = Annotated[
    int | None,
    typer.Option("--max-tokens", "-n", min=1, help="New tokens at most \\[default: the bundle's]."),
]
Temperature = Annotated[
    float | None,
    typer.Option("--temperature", "-t", min=0.0, help="0 = greedy \\[default: the bundle's]."),
]
TopP = Annotated[
    float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
]
Seed = Annotated[int | None, typer.Option("--seed", help="Sampling seed (same seed, same text).")]


def load_generation_bundle(path: Path) -> LMBundle:
    """The generation bundle at ``path`` (a BundleError naming the task otherwise)."""
    from kiln.lm_bundle import LMBundle

    return LMBundle.load(path)


@reports_errors
def generate(
    bundle: BundleArg,
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).")],
    system: SystemOpt = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    json_out: JsonOut = False,
) -> None:
    """Generate an answer to PROMPT, streamed to stdout as it is decoded.

    Chat bundles wrap the prompt in their chat template as a user turn; completion and
    text bundles continue it as raw text. With --json, one object with the text, the
    finish reason and the token counts, once done.
    """
    from kiln.settings import apply_threads, get_settings

    apply_threads(get_settings())
    text = _utf8(sys.stdin.read() if prompt == "-" else prompt, "prompt")
    b = load_generation_bundle(bundle)
    stream = b.stream(
        text,
        system=system,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    if json_out:
        for _ in stream:
            pass
        done = stream.completion
        print_json(
            {
                "text": done.text,
                "finish_reason": done.finish_reason,
                "usage": {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
            }
        )
        return
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    done = stream.completion
    if done.finish_reason == "length":
        err_console.print(
            f"(stopped at --max-tokens {done.completion_tokens}; raise it for a longer answer)",
            highlight=False,
        )


@reports_errors
def chat(
    bundle: BundleArg,
    system: SystemOpt = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
) -> None:
    """Chat with a generation bundle: type a message, read the streamed answer.

    The conversation is kept and sent whole each turn. /reset starts over; Ctrl-D or
    /exit leaves.
    """
    import contextlib

    from kiln.data.dialogs import Message
    from kiln.errors import KilnError
    from kiln.settings import apply_threads, get_settings

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()

    apply_threads(get_settings())
    b = load_generation_bundle(bundle)
    err_console.print(
        f"chatting with [bold]{b.name}[/] (/reset starts over, Ctrl-D leaves)", highlight=False
    )
    history: list[Message] = [] if system is None else [Message(role="system", content=system)]
    settings: Sampling = {
        "max_new_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system is not None else []
            err_console.print("(conversation cleared)", highlight=False)
            continue
        if not line.strip():
            continue
        try:
            answer = _turn(
                b, [*history, Message(role="user", content=_utf8(line, "input"))], settings
            )
        except KilnError as exc:  # e.g. the conversation outgrew the context: say so, go on
            sys.stdout.write("\n")
            err_console.print(f"error: {exc.message} (/reset starts over)", highlight=False)
            continue
        history += [Message(role="user", content=line), Message(role="assistant", content=answer)]


def _turn(b: LMBundle, messages: list[Message], settings: Sampling) -> str:
    """Stream one answer to stdout and return it; Ctrl-C stops the answer (what was
    streamed so far is kept), not the chat."""
    sys.stdout.write(f"{b.name}> ")
    stream = b.stream(messages, **settings)
    shown: list[str] = []
    try:
        for delta in stream:
            shown.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write(" [stopped]\n")
        return "".join(shown)
    sys.stdout.write("\n")
    return stream.completion.text


def _utf8(text: str, field: str) -> str:
    """``text`` as given, or a DataError when it is not valid UTF-8 (bytes the terminal
    could not decode)."""
    from kiln.errors import DataError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"the {field} is not valid UTF-8 text", field=field) from None
    return text


@reports_errors
def import_model(
    source: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face model directory, a .gguf file, or pkg:<package>/<path>.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Model name \\[default: from SOURCE].")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=4, help="Tokens per input at most.")
    ] = None,
    force: Annotated[
        bool, flag("--force", help="Replace a bundle of another model in --out.")
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Turn a pretrained model into a bundle as it is, without training.

    A causal language model becomes a generation bundle (kiln generate, kiln chat,
    kiln evaluate, kiln compress); a sentence encoder an embedding bundle (mean pooling,
    normalised vectors).
    """
    from kiln.bundle import check_destination
    from kiln.lm_workflow import import_pretrained
    from kiln.settings import apply_threads, get_settings

    apply_threads(get_settings())
    check_destination(out)
    with err_console.status(f"importing {source}"):
        bundle = import_pretrained(source, name=name, max_length=max_length)
    check_destination(out, name=bundle.name, force=force)
    bundle.save(out)
    meta = bundle.meta
    if json_out:
        print_json(
            {
                "bundle": str(out),
                "name": meta.name,
                "task": meta.task,
                "parameters": meta.parameters,
            }
        )
        return
    console.print(
        f"imported [bold]{meta.name}[/] ({meta.task}, {meta.parameters:,} parameters)",
        highlight=False,
    )
    console.print(f"saved bundle: [bold]{out}[/]")

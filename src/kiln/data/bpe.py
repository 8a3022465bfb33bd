"""A byte-level BPE tokenizer learned from a training split (for ``model.type: gpt``).

Byte-level: every string encodes (no unknown token) and decodes back exactly. The
vocabulary starts with the special tokens (``<|pad|>`` = 0, ``<|endoftext|>`` = 1, the
EOS and BOS token, then the chat role markers), then the 256 byte symbols, then the
learnt merges. Training is deterministic: the same texts learn the same vocabulary and
merges in any process (merge ties are broken by token ids; the alphabet is fixed).
The tokenizer itself adds no BOS or EOS to what it encodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"  # noqa: S105 (a token, no password)
EOS_TOKEN = "<|endoftext|>"  # noqa: S105
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
# The role markers of kiln.data.lm_encode.DEFAULT_CHAT_TEMPLATE: one token each.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


def train_bpe_tokenizer(
    texts: list[str],
    vocab_size: int,
    *,
    chat_template: str | None = None,
    extra_special_tokens: tuple[str, ...] = CHAT_TOKENS,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens learnt from ``texts``.

    pad = ``<|pad|>`` (id 0), eos = bos = ``<|endoftext|>`` (id 1); ``extra_special_tokens``
    (by default the default chat template's role markers) are kept whole, ids 2, 3, ...
    The chat template is ``chat_template``, or
    :data:`kiln.data.lm_encode.DEFAULT_CHAT_TEMPLATE`. It saves and loads with
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_special_tokens]))
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte symbols")
    tok = Tokenizer(models.BPE())
    # no prefix space: "a" at a text's start and after a newline tokenise alike
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # it writes blank lines when stdout is no terminal
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        model_max_length=1 << 30,  # the model's max_length bounds examples, not this
    )
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    if chat_template is None:
        from kiln.data.lm_encode import DEFAULT_CHAT_TEMPLATE

        chat_template = DEFAULT_CHAT_TEMPLATE
    fast.chat_template = chat_template
    return fast

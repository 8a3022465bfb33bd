"""Text inputs: joining text columns, tokenizers, and token tensors padded per batch.

Encoded text is one int64 tensor (N, 2, L): channel 0 holds token ids, channel 1 the
attention mask. A set is padded to its longest row once; every batch is then trimmed
to its own longest row (``trim_padding``), so batches are padded per batch, not to a
global maximum. Tokenizers are Hugging Face fast tokenizers, saved as JSON files in a
bundle's ``tokenizer/`` folder; loading them executes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kiln.errors import BundleError, DataError, SpecError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0..3 in trained tokenizers


def join_text(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """One string per row (columns joined by a space); empty text is a DataError."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"input is missing text column(s) {missing}", field=missing[0])
    parts = [frame[c].astype(object).where(frame[c].notna(), "").astype(str) for c in columns]
    joined = parts[0] if len(parts) == 1 else pd.concat(parts, axis=1).agg(" ".join, axis=1)
    stripped = joined.str.strip()
    empty = (stripped == "").to_numpy()
    if empty.any():
        row = frame.index[int(np.flatnonzero(empty)[0])]  # the table's row, not the split's
        name = columns[0] if len(columns) == 1 else "+".join(columns)
        raise DataError(f"text column {name!r}, row {row}: the text is empty", field=name)
    return stripped.tolist()


def train_tokenizer(texts: list[str], vocab_size: int, lowercase: bool) -> PreTrainedTokenizerBase:
    """A WordPiece tokenizer learned from ``texts`` (the training split only)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    norm = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        norm.insert(0, normalizers.Lowercase())
    normalizer = normalizers.Sequence(norm)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers continuation pieces ("##e") in hash-map order, and merge ties
    # are broken by those numbers, so the same texts could learn a different vocabulary
    # in another process (huggingface/tokenizers#1794). Giving every continuation
    # piece a fixed id up front (sorted, as the trainer already does for the alphabet)
    # leaves nothing to hash order: the same texts always learn the same vocabulary.
    continuations: set[str] = set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            continuations.update(word[1:])
    seeded = [f"##{c}" for c in sorted(continuations)]
    # no progress display: it writes blank lines to stdout when stdout is no terminal
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *seeded], show_progress=False
    )
    learner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learner.normalizer, learner.pre_tokenizer = normalizer, pre_tokenizer
    learner.train_from_iterator(texts, trainer=trainer)
    # A fresh tokenizer over the learned vocabulary: the seeded pieces were "special"
    # only to the trainer and must stay ordinary vocabulary here.
    learned = [t for t in learner.get_vocab() if t not in SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(learned)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def load_tokenizer(path: str | Path, *, for_bundle: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a local Hugging Face directory (or a hub id when online)."""
    from transformers import AutoTokenizer

    if for_bundle and not Path(path).is_dir():
        raise BundleError(f"the bundle's tokenizer folder is missing: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path),
            use_fast=True,
            trust_remote_code=False,
            # a bundle or a local folder never reaches the network; a hub id gets here
            # only where KILN_ALLOW_HUB allowed it (kiln.models.pretrained.local_model_dir)
            local_files_only=for_bundle or Path(path).is_dir(),
        )
    except (OSError, ValueError) as exc:
        err = BundleError if for_bundle else SpecError
        raise err(
            f"cannot load a tokenizer from {path}: {_first_line(exc)}", field="model.path"
        ) from None
    if tok.pad_token_id is None:
        raise SpecError(f"the tokenizer in {path} has no padding token", field="model.path")
    return tok


def encode(tok: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> np.ndarray:
    """Tokenize (truncating to ``max_length``) into (N, 2, L) int64, L = longest row.

    Padding goes on the right, which ``trim_padding`` relies on.
    """
    tok.padding_side = "right"
    enc = tok(
        texts,
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="np",
        return_token_type_ids=False,
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    return np.stack([ids, mask], axis=1)


def is_tokens(x: torch.Tensor) -> bool:
    """Whether a tensor holds encoded text (N, 2, L) rather than features or pixels."""
    return x.dim() == 3 and x.dtype == torch.long and x.shape[1] == 2


def trim_padding(x: torch.Tensor) -> torch.Tensor:
    """Cut a token batch (B, 2, L) to its longest row: padding is per batch."""
    length = int(x[:, 1].sum(dim=1).max())
    return x[:, :, : max(length, 1)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

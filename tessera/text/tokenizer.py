"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers`, saved as a standard `tokenizer.json`.

The special tokens come first, so their ids are fixed and match `ModelConfig`'s defaults
(pad 0, begin 1, end/EOS 2, image 3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tessera.errors import CheckpointError

PAD, BEGIN, END, IMAGE = "<pad>", "<|begin|>", "<|end|>", "<image>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BEGIN, END, IMAGE, SYSTEM, USER, ASSISTANT)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: any text round-trips, no unknown token) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def special_token_texts(tokenizer: Tokenizer) -> set[str]:
    """The texts the tokenizer reads as special tokens wherever they appear (tessera's role, image and sequence
    tokens; an imported model's BOS, EOS, header and image tokens)."""
    return {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}


def load_tokenizer(path: str | Path, required_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A tokenizer.json holding `required_tokens` (tessera's special tokens; an imported checkpoint's tokenizer
    brings its own)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file; expected a Hugging Face tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None
    missing = [t for t in required_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"{path}: the tokenizer lacks the special token {missing[0]!r}; "
                              f"expected all of {', '.join(required_tokens)}")
    return tokenizer

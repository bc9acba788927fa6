"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers`, saved as a standard `tokenizer.json`.

The special tokens come first, so their ids are fixed and match `ModelConfig`'s defaults
(pad 0, begin 1, end/EOS 2, image 3).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tessera.errors import CheckpointError

PAD, BEGIN, END, IMAGE = "<pad>", "<|begin|>", "<|end|>", "<image>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BEGIN, END, IMAGE, SYSTEM, USER, ASSISTANT)
SMALLEST_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte and the special tokens, before any merge
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


class Token(NamedTuple):
    id: int
    span: tuple[int, int]  # its characters in the text
    added: bool  # added around the text by the tokenizer's post-processor (BOS), not read from it


class MessageTextEncoder:
    """Encodes prompts so that a special token typed inside a message (an HTML `</s>` to a Llama 2 tokenizer, a
    role token pasted into a chat) is read as the characters it is, as a model's other text is; read as the token,
    it would end or forge a turn. Only the image token stays a token there: text places images with it.

    Where no message text holds a special token, the prompt is tokenized exactly as the tokenizer does it alone."""

    def __init__(self, tokenizer: Tokenizer, image_token: str):
        self.tokenizer = tokenizer
        # a whitespace-only special token (some tokenizers mark one so) stays the token: it is how the tokenizer
        # reads that whitespace anywhere
        self.typeable = sorted(t for t in special_token_texts(tokenizer) - {image_token} if t.strip())
        self.typeable_ids = {tokenizer.token_to_id(t) for t in self.typeable}
        self.added = {i: token.content for i, token in tokenizer.get_added_tokens_decoder().items()}

    @cached_property
    def plain(self) -> Tokenizer:
        """A copy of the tokenizer that reads special tokens' characters as text (made on first need: copying a
        large vocabulary takes a while)."""
        return _plain_copy(json.loads(self.tokenizer.to_str()))

    @cached_property
    def plain_inside(self) -> Tokenizer:
        """The same, for a stretch that does not start the text: a Metaspace pre-tokenizer that puts its "▁" only
        before the text's first word (prepend_scheme "first", Llama 2 and Mistral as transformers converts them
        now) must not put one before the stretch."""
        config = json.loads(self.tokenizer.to_str())
        return _plain_copy(config) if _prepend_only_first_never(config) else self.plain

    def typed_special_token(self, text: str) -> str | None:
        """The special token (the image token aside) whose characters come first in `text`, if any."""
        found = [(text.find(token), token) for token in self.typeable if token in text]
        return min(found)[1] if found else None

    def encode(self, text: str, typed: Sequence[tuple[int, int]] = (), add_special_tokens: bool = False
               ) -> list[Token]:
        """The tokens of `text`, with the special tokens whose characters overlap the character spans `typed`
        (the message texts that hold one) read as text.

        The tokenizer cuts a text at its added tokens and tokenizes each stretch between them on its own. A stretch
        that holds a typed token is tokenized again, whole, by a copy of the tokenizer that reads special tokens as
        text; every other token is the tokenizer's own."""
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        tokens = [Token(i, span, sequence is None)
                  for i, span, sequence in zip(encoding.ids, encoding.offsets, encoding.sequence_ids)]
        body = [n for n, token in enumerate(tokens) if not token.added]  # not the post-processor's BOS or EOS
        if not typed or not body:
            return tokens
        out, stretch, typed_in_stretch, start = tokens[:body[0]], [], False, 0
        for token in tokens[body[0]:body[-1] + 1]:
            content = self.added.get(token.id)
            # where the token's own characters are: its span may hold whitespace it strips (lstrip/rstrip), and an
            # id the model produced (an unknown character's <unk>) is no added token here at all
            at = text.find(content, *token.span) if content else -1
            # typed when its characters touch a message's: a template writes whole tokens of its own, and a token
            # reaching past a typed span was made of the message's characters with the next part's or the template's
            if at >= 0 and token.id in self.typeable_ids and any(a < at + len(content) and at < b for a, b in typed):
                typed_in_stretch = True
                stretch.append(token)
            elif at >= 0:  # a cut the tokenizer made, kept
                out += self._stretch(text, start, token.span[0], stretch, typed_in_stretch)
                out.append(token)
                stretch, typed_in_stretch, start = [], False, token.span[1]
            else:
                stretch.append(token)
        return out + self._stretch(text, start, len(text), stretch, typed_in_stretch) + tokens[body[-1] + 1:]

    def _stretch(self, text: str, start: int, end: int, tokens: list[Token], typed: bool) -> list[Token]:
        """The tokens of the text between two cuts: the tokenizer's own, or, when a typed token is among them, the
        stretch read again with special tokens as text."""
        if not typed:
            return tokens
        encoding = (self.plain if start == 0 else self.plain_inside).encode(text[start:end], add_special_tokens=False)
        return [Token(i, (a + start, b + start), False) for i, (a, b) in zip(encoding.ids, encoding.offsets)]


def _plain_copy(config: dict) -> Tokenizer:
    plain = Tokenizer.from_str(json.dumps(config))
    plain.encode_special_tokens = True
    return plain


def _prepend_only_first_never(config: dict) -> bool:
    """Turns every Metaspace pre-tokenizer's prepend_scheme "first" into "never"; whether there was one."""
    found = False

    def visit(node):
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"], found = "never", True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config.get("pre_tokenizer"))
    return found


def load_tokenizer(path: str | Path, required_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A tokenizer.json holding `required_tokens` (tessera's special tokens; an imported checkpoint's tokenizer
    brings its own). Truncation and padding a file may set are turned off, as transformers turns them off: a prompt
    is cut (training) or refused (serving) by its processor, knowing where its answer and images are."""
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
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer

"""Choosing the next token: greedy, temperature, top-k and top-p sampling, and the stop conditions."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.config import is_integer
from tessera.errors import ConfigError

# Below this, temperature sampling is greedy in all but name, and dividing the logits by it overflows float32 to
# inf (1e-40: every request sharing the batch failed). So it is decoded greedily, as vLLM does below 1e-5.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """temperature 0 (or below GREEDY_BELOW) means greedy decoding; otherwise sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens (0: no limit) and the smallest set
    whose probability reaches top_p."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: Sequence[str] = ()
    eos_token_ids: Sequence[int] = ()
    suppress_token_ids: Sequence[int] = field(default_factory=tuple)  # never generated (e.g. <image>, <pad>)

    def __post_init__(self) -> None:
        # ConfigError is a ValueError: callers that caught ValueError still do
        if not is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1")
        temperature, top_p = _real(self.temperature), _real(self.top_p)
        if temperature is None or not 0 <= temperature < math.inf:  # inf: suppressed tokens' -inf / inf is NaN
            raise ConfigError(f"temperature={self.temperature!r}: expected a finite number >= 0 (0 is greedy)")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 disables it)")
        if top_p is None or not 0 < top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r}: expected a number in (0, 1]")
        self.temperature, self.top_p = temperature, top_p
        if self.seed is not None:
            if not _is_seed(self.seed):
                raise ConfigError(f"seed={self.seed!r}: expected an integer in -2**63..2**64-1 or None")
            self.seed = operator.index(self.seed)  # torch.Generator takes no numpy integer
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings={self.stop_strings!r}: expected non-empty strings")
        for name in ("eos_token_ids", "suppress_token_ids"):  # as ints: a tensor's 0-d elements match no token
            value = getattr(self, name)
            ids = token_ids(value)
            if ids is None:
                raise ConfigError(f"{name}={value!r}: expected a token id or a collection of them")
            setattr(self, name, ids)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse EOS or suppressed ids this vocabulary does not hold (an EOS id past it would silently never stop
        generation), and suppressing every token: with every logit at -inf, argmax emits token 0 regardless."""
        for name in ("eos_token_ids", "suppress_token_ids"):
            ids = getattr(self, name)
            if not all(0 <= i < vocab_size for i in ids):
                raise ConfigError(f"{name}={ids!r}: expected token ids in 0..{vocab_size - 1} "
                                  f"(the model's vocabulary of {vocab_size})")
        if len(set(self.suppress_token_ids)) == vocab_size:
            raise ConfigError(f"suppress_token_ids: all {vocab_size} tokens of the vocabulary; expected at least one "
                              f"token left to generate")

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        seed = self.seed
        if torch.device(device).type == "cpu" and not -2**31 <= seed < 2**32:
            # the CPU's Mersenne Twister keeps the seed's low 32 bits only (5 and 5 + 2**32 drew the same numbers):
            # the high half, scrambled (a multiple of the golden ratio), is folded in, so seeds apart in it sample
            # apart; a seed from -2**31 to 2**32 - 1 draws what it drew
            seed %= 2**64  # as manual_seed reads a negative seed
            seed = (seed ^ (seed >> 32) * 0x9E3779B9) & 0xFFFFFFFF
        return torch.Generator(device=device).manual_seed(seed)


def _real(value: object) -> float | None:
    """A number as a float — numpy's and one-element tensors too —, or None for anything else: text ("0.7"),
    which failed inside a comparison, and True."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def token_ids(value: object) -> tuple[int, ...] | None:
    """A token id or ids (a list, a set, a tensor, a numpy array; numpy's integers too) as a tuple of ints, or None
    for anything else: text would be split into characters, floats are no ids, and True would read as token 1."""
    try:
        ids = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
        if isinstance(ids, (str, bytes)):
            raise TypeError
        ids = (ids,) if not isinstance(ids, Iterable) else tuple(ids)
        if any(isinstance(i, (bool, np.bool_)) for i in ids):
            raise TypeError
        return tuple(operator.index(i) for i in ids)
    except TypeError:  # text, floats, booleans, or a collection holding them
        return None


def _is_seed(value: object) -> bool:
    """An integer (numpy's too) that torch.Generator.manual_seed takes."""
    try:
        seed = operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool) and -2**63 <= seed < 2**64


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits of the last position → (batch,) chosen token ids."""
    logits = logits.float()
    if params.suppress_token_ids:
        logits = logits.clone()  # .float() of float32 logits is the caller's tensor: leave it as it was
        logits[:, list(params.suppress_token_ids)] = float("-inf")
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = truncated(logits / params.temperature, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def truncated(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(batch, vocab) logits already divided by the temperature, with the tokens outside top_k and top_p at -inf
    (transformers' TopKLogitsWarper and TopPLogitsWarper)."""
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        # transformers' (and vLLM's) rule, tie order included: from the least likely token up, drop tokens while
        # their mass stays within 1 - top_p; of tied tokens at the boundary the lower ids go first
        sorted_logits, order = logits.sort(dim=-1, stable=True)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - params.top_p
        drop[:, -1] = False  # the top token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class TokenChooser:
    """Picks the next token of every row: with one SamplingParams for the whole batch (one random stream), or with
    one per row — each row then has its own settings and its own seeded stream, so a request samples the same
    tokens whatever it is batched with, and a greedy row stays exactly greedy."""

    def __init__(self, params: SamplingParams | Sequence[SamplingParams], batch_size: int, device: torch.device,
                 vocab_size: int):
        for p in [params] if isinstance(params, SamplingParams) else params:
            p.check_vocabulary(vocab_size)
        if isinstance(params, SamplingParams):
            self.shared: tuple[SamplingParams, torch.Generator | None] | None = (params, params.generator(device))
            self.rows = []
            self.max_new_tokens = params.max_new_tokens
        else:
            if len(params) != batch_size:
                raise ValueError(f"{len(params)} SamplingParams for a batch of {batch_size}; expected one per row")
            self.shared = None
            self.rows = [(p, p.generator(device)) for p in params]
            self.max_new_tokens = max(p.max_new_tokens for p in params)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return next_tokens(logits, *self.shared)
        return torch.cat([next_tokens(logits[i:i + 1], p, g) for i, (p, g) in enumerate(self.rows)])


class StopChecker:
    """Tracks, per sample, whether generation has finished and why ("stop" or "length")."""

    def __init__(self, batch_size: int, params: SamplingParams, decode: Callable[[list[int]], str] | None):
        if params.stop_strings and decode is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=")
        self.params = params
        self.decode = decode
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.finish_reasons: list[str | None] = [None] * batch_size

    @property
    def all_done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def add(self, tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            if self.finish_reasons[i] is not None:
                continue
            if token in self.params.eos_token_ids:
                self.finish_reasons[i] = "stop"
                continue
            self.tokens[i].append(token)
            if self.params.stop_strings and self._hit_stop_string(i):
                self.finish_reasons[i] = "stop"
            elif len(self.tokens[i]) >= self.params.max_new_tokens:
                self.finish_reasons[i] = "length"

    def finish(self) -> None:
        self.finish_reasons = [reason or "length" for reason in self.finish_reasons]

    def _hit_stop_string(self, i: int) -> bool:
        text = self.decode(self.tokens[i])
        return any(s in text for s in self.params.stop_strings)

    def text(self, i: int) -> str:
        """The decoded text of sample i, cut before the first stop string."""
        text = self.decode(self.tokens[i])
        for s in self.params.stop_strings:
            text = text.split(s, 1)[0]
        return text

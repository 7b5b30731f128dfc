"""Text generation with the elastic model's KV cache (after gpt-fast's ``generate.py``).

``Generator`` keeps the tokens whose keys and values sit in the cache, so a chat turn prefills
only what its prompt adds to them (the longest common prefix is reused), and a rate switch,
which empties the cache, re-fills the whole conversation on the next turn. Prefill runs in
chunks, which bounds the activations' memory whatever the prompt's length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import ElastiqError
from ..modeling.model import Transformer

PREFILL_CHUNK = 256  # tokens per prefill pass: bounds activation memory (the runtime's workspace)


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else softmax(logits / temperature), optionally over the
    ``top_k`` most likely tokens and the smallest set of them holding ``top_p`` of the probability
    (nucleus sampling), drawn with ``seed``."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ElastiqError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ElastiqError(f"top_k must be a positive number of tokens, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ElastiqError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationStats:
    """What one ``generate`` call did: tokens prefilled (after the reused prefix) and decoded, and
    the seconds each phase took."""

    reused: int = 0
    prefilled: int = 0
    decoded: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decoded / self.decode_s if self.decode_s else float("nan")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from next-token ``logits`` [vocab]."""
    if sampling.temperature == 0:
        return int(logits.float().argmax())  # the same token; torch's argmax is ~3x faster on float32 than bf16
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        outside = probs.cumsum(-1) - probs >= sampling.top_p  # the tokens after the nucleus is full
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


class CachedGenerator:
    """Prefill and decode one sequence on a backend that keeps a KV cache of ``max_seq`` positions:
    ``_run(tokens, start)`` runs ``tokens`` from cache position ``start`` (dropping what the cache
    held beyond it) and returns the last position's next-token logits [vocab]. ``cached`` lists the
    tokens whose keys and values the cache holds."""

    def __init__(self, max_seq: int):
        self.max_seq = max_seq
        self.cached: list[int] = []

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        raise NotImplementedError

    def _resumable(self, start: int) -> bool:
        """Whether ``_run`` may go on from cache position ``start`` (a KV cache can from any)."""
        return True

    def reset(self) -> None:
        """Empty the cache: the next prefill runs every token."""
        self.cached = []

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Bring the cache to hold ``ids``, reusing their longest common prefix with what it holds;
        returns the next-token logits [vocab] and the number of tokens reused."""
        if not ids:
            raise ElastiqError("nothing to generate from: the prompt has no tokens")
        if len(ids) >= self.max_seq:
            raise ElastiqError(f"the prompt has {len(ids)} tokens; the context holds {self.max_seq} "
                               "(raise --ctx, or start a new conversation)")
        reused = 0
        for a, b in zip(self.cached, ids[:-1]):  # the last token is always run: its logits are needed
            if a != b:
                break
            reused += 1
        if reused and not self._resumable(reused):  # a recurrent state cannot go back: run every token
            reused = 0
        logits = self._run(list(ids[reused:]), reused)
        self.cached = list(ids)
        return logits, reused

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> GenerationStats:
        """Continue ``ids`` by up to ``max_new_tokens`` tokens, stopping after a token in ``stop``
        (kept in ``stats.tokens``) or when the context is full; each new token is passed to
        ``on_token`` as soon as it is chosen."""
        stats = GenerationStats()
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
        t0 = time.perf_counter()
        logits, stats.reused = self.prefill(ids)
        stats.prefilled = len(ids) - stats.reused
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while max_new_tokens > 0:
            token = sample(logits, sampling, generator)
            stats.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(stats.tokens) == max_new_tokens or len(self.cached) >= self.max_seq:
                break  # the last token is not run: a next turn's prefill starts from it
            logits = self._run([token], len(self.cached))
            self.cached.append(token)
        stats.decoded = len(stats.tokens)
        stats.decode_s = time.perf_counter() - t0
        return stats


class Generator(CachedGenerator):
    """Generation on the elastic model, whose KV caches hold ``max_seq`` positions; prefill runs
    in chunks of ``PREFILL_CHUNK`` tokens."""

    def __init__(self, model: Transformer, max_seq: int):
        super().__init__(max_seq)
        self.model = model
        model.setup_caches(1, max_seq)

    def reset(self, model: Transformer | None = None) -> None:
        """Empty the caches (for ``model`` when the model was replaced, as a rate switch does)."""
        self.model = model or self.model
        self.model.setup_caches(1, self.max_seq)
        super().reset()

    def _resumable(self, start: int) -> bool:
        return self.model.resumable(start)  # a Mamba2 block's state only from the position it reached

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        device, logits = self.model.device, None
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = torch.tensor([tokens[i:i + PREFILL_CHUNK]], device=device)
            logits = self.model(chunk, start=start + i, last_only=True)[0, -1]
        return logits


class TextStream:
    """Turns token ids into printable text as they come: the decoded text is re-derived from all
    tokens so far, and only a stable suffix (no partial UTF-8 character) is emitted."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

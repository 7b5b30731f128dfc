"""Log-likelihood of continuations, as lm-evaluation-harness computes it for decoder-only models.

The model is any ``LogitsFn``: token ids ``[B, T]`` (right-padded) to logits ``[B, T, V]``. With
right padding and causal attention a real position never sees a pad, so no attention mask is
needed and the same function can wrap torch, llama.cpp or onnxruntime backends.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the whole string is encoded once
    and the continuation is what follows the separately encoded context's length. Special tokens
    are the tokenizer's default (a BOS only where its post-processor adds one), as in the
    harness. An empty context becomes the BOS (or EOS) token, so the first continuation token
    has something to be predicted from.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def score(logits_fn: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
          batch_tokens: int = 4096, desc: str | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) request.

    Requests are sorted longest first and packed into batches of at most ``batch_tokens`` padded
    tokens; inputs longer than ``max_length`` keep their last ``max_length`` tokens.
    """
    out = [0.0] * len(requests)
    for k, logprobs, target in _continuations(logits_fn, requests, max_length, batch_tokens, desc):
        out[k] = logprobs.gather(-1, target[:, None]).sum().item()
    return out


def greedy_matches(logits_fn: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                   batch_tokens: int = 4096, desc: str | None = None) -> list[bool]:
    """Whether greedy decoding after each context produces exactly its continuation: every
    continuation token is the argmax at its position (the harness's ``is_greedy``)."""
    out = [False] * len(requests)
    for k, logprobs, target in _continuations(logits_fn, requests, max_length, batch_tokens, desc):
        out[k] = bool(torch.equal(logprobs.argmax(-1), target))
    return out


def _continuations(logits_fn: LogitsFn, requests: Sequence[tuple[list[int], list[int]]], max_length: int,
                   batch_tokens: int, desc: str | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(request index, log-probabilities [n, V] at the continuation's n positions, its ids [n]) for
    every request, run in batches as ``score`` describes."""
    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        seq = (context + continuation)[-(max_length + 1):]
        predicted = min(len(continuation), len(seq) - 1)
        prepared.append((seq[:-1], seq[-predicted:]))
    order = sorted(range(len(prepared)), key=lambda k: -len(prepared[k][0]))
    with tqdm(total=len(order), desc=desc, disable=desc is None, leave=False) as bar, torch.inference_mode():
        start = 0
        while start < len(order):
            width = len(prepared[order[start]][0])
            batch = order[start:start + max(1, batch_tokens // width)]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, k in enumerate(batch):
                ids[row, :len(prepared[k][0])] = torch.tensor(prepared[k][0])
            logits = logits_fn(ids)
            for row, k in enumerate(batch):
                inputs, target = prepared[k]
                end = len(inputs)
                yield k, logits[row, end - len(target):end].float().log_softmax(-1), torch.tensor(target)
            start += len(batch)
            bar.update(len(batch))

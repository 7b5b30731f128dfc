"""WikiText-2 perplexity over non-overlapping windows (the GPTQ convention).

The raw test file is tokenized as one text (with the tokenizer's default special tokens), cut into ``len // seqlen`` windows of
``seqlen`` tokens, and every window predicts its tokens 2..seqlen from the ones before. The
perplexity is exp of the mean token negative log-likelihood over all windows, which equals
GPTQ's exp(mean of per-window mean losses) because every window has the same length.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import ElastiqError
from ..divergence import Divergence
from .loglikelihood import LogitsFn
from .tasks import WIKITEXT2_TEST
from .zeroshot import mean_stderr


def wikitext2_tokens(tokenizer, data: Path) -> torch.Tensor:
    """The WikiText-2 test split as one 1-D tensor of token ids."""
    path = data / WIKITEXT2_TEST
    if not path.is_file():
        raise ElastiqError(f"WikiText-2 test file {path} is missing")
    return torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8")))


def perplexity(logits_fn: LogitsFn, tokens: torch.Tensor, seqlen: int = 2048,
               limit: int | None = None, progress: bool = True, reference: LogitsFn | None = None) -> dict:
    """Token-level perplexity of ``tokens`` in non-overlapping windows of ``seqlen``; with a
    ``reference`` model, also the KL divergence to it on the same tokens (``divergence``, and each
    window's mean in ``window_kl``, for paired comparisons)."""
    available = tokens.numel() // seqlen
    if seqlen < 2 or available == 0:
        raise ElastiqError(f"--seqlen {seqlen} must be at least 2 and at most the {tokens.numel()} tokens available")
    windows = available if limit is None else min(limit, available)
    start = time.perf_counter()
    window_nll, divergence = [], Divergence()
    with torch.inference_mode():
        for w in tqdm(range(windows), desc="wikitext2", disable=not progress, leave=False):
            ids = tokens[w * seqlen:(w + 1) * seqlen][None]
            logits = logits_fn(ids)[0, :-1].float()
            window_nll.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
            if reference is not None:
                divergence.add(reference(ids)[0, :-1], logits)
    nll = sum(window_nll) / windows
    result = {"seqlen": seqlen, "windows": windows, "tokens_scored": windows * (seqlen - 1),
              "ppl": math.exp(nll), "nll": nll, "nll_stderr": mean_stderr(window_nll),
              "window_nll": window_nll}
    if reference is not None:
        result["divergence"] = divergence.summary()
        result["window_kl"] = [kl.mean().item() for kl in divergence.kl]
    return {**result, "seconds": time.perf_counter() - start}

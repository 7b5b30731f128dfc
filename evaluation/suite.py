"""Run WikiText-2 perplexity and the zero-shot tasks on one model; collect one results dict."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from ..paths import data_dir
from .loglikelihood import LogitsFn
from .perplexity import perplexity, wikitext2_tokens
from .tasks import TASKS, get_task
from .zeroshot import evaluate_task

PERPLEXITY = "wikitext2"
ALL_MEASURES = (PERPLEXITY, *TASKS)


def hf_logits(model: torch.nn.Module) -> LogitsFn:
    """A ``LogitsFn`` for a transformers causal LM (no KV cache: every call is a full pass)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def check_measures(measures: Sequence[str]) -> None:
    """Refuse an unknown measure before any model is loaded (the error lists the known ones)."""
    for name in measures:
        if name != PERPLEXITY:
            get_task(name)


def run_suite(logits_fn: LogitsFn, tokenizer, model_name: str, measures: Sequence[str] = ALL_MEASURES,
              seqlen: int = 2048, windows: int | None = None, limit: int | None = None,
              max_length: int = 2048, batch_tokens: int = 4096, data: Path | None = None,
              progress: bool = True, reference: LogitsFn | None = None) -> dict:
    """Evaluate ``measures`` (``wikitext2`` and task names); ``limit`` caps items per task and,
    unless ``windows`` is given, perplexity windows too. With a ``reference`` model, the
    perplexity windows also measure the KL divergence to it."""
    check_measures(measures)
    data = data or data_dir()
    start = time.perf_counter()
    results: dict = {
        "model": model_name,
        "elastiq": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": {},
    }
    for name in measures:
        if name == PERPLEXITY:
            tokens = wikitext2_tokens(tokenizer, data)
            results[PERPLEXITY] = perplexity(logits_fn, tokens, seqlen, windows if windows is not None else limit,
                                             progress, reference)
        else:
            task = get_task(name)
            items = task.load(data)[:limit]
            results["tasks"][name] = evaluate_task(task, items, logits_fn, tokenizer, max_length,
                                                   batch_tokens, progress)
    results["seconds"] = time.perf_counter() - start
    return results

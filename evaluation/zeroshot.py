"""Zero-shot accuracy with lm-evaluation-harness's definitions: multiple choice (acc and acc_norm)
and greedy continuation (acc of ``is_greedy``)."""

from __future__ import annotations

import math
import time
from typing import Sequence

from .loglikelihood import LogitsFn, encode_pair, greedy_matches, score
from .tasks import Item, Task


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracies(items: Sequence[Item], loglikelihoods: Sequence[Sequence[float]]) -> dict:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per character of the
    choice, as the harness's ``len(choice)``), each with its standard error, and per-item
    correctness so that two models can be compared item by item (paired) on any prefix."""
    acc, acc_norm = [], []
    for item, lls in zip(items, loglikelihoods):
        acc.append(float(_argmax(lls) == item.gold))
        acc_norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.gold))
    n = len(items)
    return {"n": n, "acc": sum(acc) / n, "acc_stderr": mean_stderr(acc),
            "acc_norm": sum(acc_norm) / n, "acc_norm_stderr": mean_stderr(acc_norm),
            "per_item": {"acc": [int(v) for v in acc], "acc_norm": [int(v) for v in acc_norm]}}


def evaluate_task(task: Task, items: Sequence[Item], logits_fn: LogitsFn, tokenizer, max_length: int,
                  batch_tokens: int = 4096, progress: bool = True) -> dict:
    """Score every choice of every item (or, for a greedy task, whether greedy decoding produces
    it) and return the task's accuracies and wall time."""
    start = time.perf_counter()
    requests = [encode_pair(tokenizer, ctx, cont) for item in items for ctx, cont in item.requests()]
    if task.greedy:
        right = [float(m) for m in greedy_matches(logits_fn, requests, max_length, batch_tokens,
                                                  desc=task.name if progress else None)]
        return {"metric": task.metric, "n": len(right), "acc": sum(right) / max(len(right), 1),
                "acc_stderr": mean_stderr(right), "per_item": {"acc": [int(v) for v in right]},
                "seconds": time.perf_counter() - start}
    flat = score(logits_fn, requests, max_length, batch_tokens, desc=task.name if progress else None)
    lls, k = [], 0
    for item in items:
        lls.append(flat[k:k + len(item.choices)])
        k += len(item.choices)
    return {"metric": task.metric, **accuracies(items, lls), "seconds": time.perf_counter() - start}

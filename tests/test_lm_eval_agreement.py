"""Our scorer against lm-evaluation-harness itself, on the same data: every choice of every item."""

from __future__ import annotations

import pytest

from elastiq.evaluation.harness import run_lm_eval
from elastiq.evaluation.loglikelihood import encode_pair, score
from elastiq.evaluation.suite import hf_logits
from elastiq.evaluation.tasks import TASKS
from elastiq.evaluation.zeroshot import accuracies

pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

LIMIT = 6


def test_scores_agree_with_lm_eval(tiny_llama, tokenizer, data_dir, tmp_path):
    # the multiple-choice tasks; last_word (greedy) has no harness config here: its log-likelihoods are
    # this scorer's, and its greedy check is tested on its own (test_scoring.py)
    choice = {name: task for name, task in TASKS.items() if not task.greedy}
    reference = run_lm_eval(tiny_llama, tokenizer, list(choice), data_dir, tmp_path, limit=LIMIT, batch_size=4)
    for name, task in choice.items():
        items = task.load(data_dir)[:LIMIT]
        requests = [encode_pair(tokenizer, c, x) for item in items for c, x in item.requests()]
        flat = iter(score(hf_logits(tiny_llama), requests, max_length=256))
        ours = [[next(flat) for _ in item.choices] for item in items]
        theirs = reference[name]["loglikelihoods"]
        assert [len(doc) for doc in ours] == [len(doc) for doc in theirs], name
        for mine, harness in zip(ours, theirs):
            assert mine == pytest.approx(harness, abs=1e-4), name
        metrics = accuracies(items, ours)
        assert metrics["acc"] == pytest.approx(reference[name]["acc"]), name
        if name != "winogrande":  # the harness defines acc only there
            assert metrics["acc_norm"] == pytest.approx(reference[name]["acc_norm"]), name

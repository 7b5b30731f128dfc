"""The scorer: lm-evaluation-harness's token split, batching that changes nothing, exact metrics."""

from __future__ import annotations

import math

import pytest
import torch

from elastiq.evaluation.loglikelihood import encode_pair, greedy_matches, score
from elastiq.evaluation.suite import hf_logits
from elastiq.evaluation.tasks import Item
from elastiq.evaluation.zeroshot import accuracies, mean_stderr


def _reference(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unbatched, unpadded forward pass."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_encode_pair_moves_trailing_space_to_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "Question: what is it?\nAnswer: ", "rain")
    assert context == tokenizer.encode("Question: what is it?\nAnswer:")
    assert context + continuation == tokenizer.encode("Question: what is it?\nAnswer: rain")
    assert tokenizer.decode(continuation) == " rain"


def test_encode_pair_empty_context_starts_from_bos(tokenizer):
    context, continuation = encode_pair(tokenizer, "", "The game")
    assert context == [tokenizer.bos_token_id]
    assert continuation == tokenizer.encode("The game")


def test_batched_scores_equal_unbatched(tiny_llama, tokenizer):
    texts = [("The game began", " development in 2010"), ("Robert Boulter is an", " English actor"),
             ("He", " had a guest starring role on the television series The Bill"), ("A", " b")]
    requests = [encode_pair(tokenizer, c, x) for c, x in texts]
    expected = [_reference(tiny_llama, c, x) for c, x in requests]
    for batch_tokens in (1, 16, 4096):  # one request per pass, a few, all in one padded batch
        got = score(hf_logits(tiny_llama), requests, max_length=256, batch_tokens=batch_tokens)
        assert got == pytest.approx(expected, abs=1e-4)


def test_long_requests_keep_their_last_tokens(tiny_llama, tokenizer):
    context, continuation = encode_pair(tokenizer, "Robert Boulter is an English film , television and theatre",
                                        " actor .")
    max_length = 6
    seq = (context + continuation)[-(max_length + 1):]
    kept = min(len(continuation), max_length)
    expected = _reference(tiny_llama, seq[:-kept], seq[-kept:])
    assert score(hf_logits(tiny_llama), [(context, continuation)], max_length)[0] == pytest.approx(expected, abs=1e-4)


def test_greedy_matches_is_every_continuation_token_the_argmax():
    """A model that always predicts "the last id plus one": a continuation counting up from the
    context is produced greedily, one that skips a number anywhere is not; batching changes nothing."""
    def counting(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((ids + 1) % 50, 50).float() * 5

    requests = [([3, 4], [5, 6, 7]), ([3, 4], [5, 7]), ([9], [11]), ([1, 2, 3, 4, 5], [6])]
    for batch_tokens in (1, 4096):
        assert greedy_matches(counting, requests, max_length=64, batch_tokens=batch_tokens) == [True, False, False,
                                                                                               True]


def test_accuracies_on_known_loglikelihoods():
    items = [
        Item(("q",) * 2, ("a", "a much longer answer"), gold=1),  # acc picks 0; per character, 1 wins
        Item(("q",) * 2, ("yes", "no!"), gold=0),                  # a tie goes to the first choice
        Item(("q",) * 3, ("x", "y", "z"), gold=2),
        Item(("q",) * 2, ("x", "y"), gold=0),
    ]
    lls = [[-2.0, -4.0], [-1.5, -1.5], [-3.0, -2.0, -1.0], [-5.0, -1.0]]
    result = accuracies(items, lls)
    assert result["per_item"] == {"acc": [0, 1, 1, 0], "acc_norm": [1, 1, 1, 0]}
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.75
    assert result["acc_norm_stderr"] == pytest.approx(0.25)  # sqrt(var_{n-1} / n) = sqrt(0.25 / 4)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))


def test_mean_stderr_matches_definition():
    assert mean_stderr([2.0, 4.0, 6.0]) == pytest.approx(2 / math.sqrt(3))
    assert math.isnan(mean_stderr([1.0]))


def test_score_rejects_empty_continuation(tiny_llama):
    with pytest.raises(ValueError, match="at least one token"):
        score(hf_logits(tiny_llama), [([1, 2], [])], max_length=16)

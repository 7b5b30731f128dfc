"""Qwen2 (and Qwen2.5): Llama's block with biases on the q, k and v projections."""

from __future__ import annotations

from .base import ATTN_K, ATTN_Q, ATTN_V, Family
from .llama import PARTS

# Written to GGUF as llama.cpp's ``llama`` (which takes q/k/v biases), so per-layer widths can go to ``deci``.
QWEN2 = Family("qwen2", model_types=("qwen2",), gguf_architectures=("qwen2",), parts=PARTS,
               biases=frozenset({ATTN_Q, ATTN_K, ATTN_V}))

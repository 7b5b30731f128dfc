"""onnxruntime running one rate's ONNX export on the CPU.

Memory (``footprint``): onnxruntime holds the file's initializers and its own prepacked copy of
every matrix; a call holds the past KV (float32, the kept widths) and its concatenated present;
each prefill chunk returns the logits of every position.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ... import ElastiqError
from ...checkpoint import Checkpoint, kv_bytes_per_token
from ...families.base import ATTENTION
from ...quants import BLOCK
from ..generate import CachedGenerator
from ..memory import Footprint, runtime_shapes, widest_mlp
from .base import Backend, block_kinds, unsupported
from .exported import ExportEngine, export_path

# The ONNX decoder returns logits for every position of a call, [chunk, vocab] float32 and copies
# of it: a smaller chunk than torch's (which computes the last position's logits only) bounds that.
ONNX_PREFILL_CHUNK = 64


def _onnx_weights(ckpt: Checkpoint, rate: float) -> int:
    """Bytes of the initializers ``write_onnx`` writes for ``rate``: MatMulNBits codes (4 or 8
    bits) and float32 scales, float32 matrices and vectors; a tied tensor once."""
    total = 0
    for name, (shape, stored_dtype, fmt) in ckpt.shapes(rate).items():
        numel = math.prod(shape)
        if fmt:
            total += (numel if fmt == "q8_0" else numel // 2) + numel // BLOCK * 4
        elif stored_dtype.is_floating_point:
            total += numel * 4
    return total


def footprint(ckpt: Checkpoint, rate: float, ctx: int, baseline: int, **_) -> Footprint:
    """What onnxruntime holds for ``rate`` with ``ctx`` positions on top of ``baseline`` bytes (above)."""
    if (why := OnnxEngine.refusal(ckpt)) is not None:
        raise ElastiqError(why)
    config = ckpt.config
    heads, vocab, hidden = ckpt.heads, config["vocab_size"], config["hidden_size"]
    widest = widest_mlp(runtime_shapes(ckpt, rate), heads)
    path = export_path(ckpt, rate, OnnxEngine.format)
    initializers = path.stat().st_size if path.is_file() else _onnx_weights(ckpt, rate)
    weights = 2 * initializers  # the initializers and onnxruntime's prepacked copy of the matrices
    widths = ckpt.rate_entry(rate)["widths"]
    kv = 2 * ctx * kv_bytes_per_token(ckpt.groups, widths, heads, 4)  # past and present during a call
    chunk = min(ctx, ONNX_PREFILL_CHUNK)
    workspace = chunk * 4 * (2 * vocab + 8 * hidden + 3 * widest + 2 * heads.num_heads * ctx)
    return Footprint(rate, weights, kv, workspace, baseline)


class OnnxGenerator(CachedGenerator):
    """Generation through an onnxruntime session of the ONNX decoder: prefill in chunks, then one
    token at a time, each call's presents fed back as the next call's past."""

    def __init__(self, session, max_seq: int):
        super().__init__(max_seq)
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
        self.cache: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.cache = {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self.past.items()}

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        self.cache = {name: v[:, :, :start] for name, v in self.cache.items()}
        for i in range(0, len(tokens), ONNX_PREFILL_CHUNK):
            chunk = np.array([tokens[i:i + ONNX_PREFILL_CHUNK]], dtype=np.int64)
            end = start + i + chunk.shape[1]
            outs = self.session.run(self.outputs, {
                "input_ids": chunk, "attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start + i, end, dtype=np.int64)[None], **self.cache})
            self.cache = {n.replace("present.", "past_key_values."): v for n, v in zip(self.outputs[1:], outs[1:])}
            logits = outs[0][0, -1]
        return torch.from_numpy(logits.copy())


class OnnxEngine(ExportEngine):
    """The rate's ONNX export run by onnxruntime on the CPU; the KV cache grows to ``ctx`` positions."""

    backend, format, requires = "onnxruntime", "onnx", ("onnxruntime", "onnxruntime")

    @staticmethod
    def refusal(ckpt: Checkpoint) -> str | None:
        """The ONNX export builds attention + MLP blocks only: another model runs on torch, and on
        llama.cpp where that backend runs it (Mamba2, Nemotron-H)."""
        from .llamacpp import LlamaCppEngine

        if block_kinds(ckpt) <= {ATTENTION}:
            return None
        instead = "--backend torch" + (" or llama.cpp" if LlamaCppEngine.refusal(ckpt) is None else "")
        return unsupported("onnxruntime", ckpt, "models of attention + MLP blocks only, the only ones the ONNX "
                           "export builds", instead)

    def _load(self, path: Path) -> OnnxGenerator:
        options = self.package.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        session = self.package.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return OnnxGenerator(session, self.ctx)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        generator = self.generator
        batch, length = ids.shape
        empty = {name: np.zeros((batch, shape[1], 0, shape[3]), np.float32) for name, shape in generator.past.items()}
        outs = generator.session.run(generator.outputs[:1], {
            "input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(), **empty})
        return torch.from_numpy(outs[0])


def _open(checkpoint, rate: float, ctx: int, tokenizer=None, **_) -> OnnxEngine:
    return OnnxEngine(checkpoint, rate, ctx, tokenizer=tokenizer)


BACKEND = Backend("onnxruntime", OnnxEngine.requires, footprint, _open, OnnxEngine.format)

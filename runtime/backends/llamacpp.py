"""llama.cpp (llama-cpp-python) running one rate's GGUF export.

Memory (``footprint``), from the export's file size when it exists and from the checkpoint's
shapes as the exporter will write them otherwise: llama.cpp maps the GGUF (every page is touched
while loading) and, where its CPU build repacks Q4_0 for its matmul kernels (``REPACK = 1``),
holds a repacked copy of every Q4_0 matrix a matmul uses (a tied LM head is the embedding's
duplicate); its KV cache is f16 at the FULL head size (pruned channels are zero-filled in the
GGUF) for ``ctx`` rounded up to 256 cells; its compute buffer is reserved for a batch of
``n_ubatch`` tokens whose every logit is an output, or the attention scores and softmax of that
batch, whichever is larger. A Mamba2 model (llama.cpp's ``mamba2``, every block at the rate's
widest P and N) holds one sequence's recurrent state instead of a KV cache, whatever the context,
and a compute buffer for the batch's logits or its input projections (``_recurrent``).

A Nemotron-H hybrid (llama.cpp's ``nemotron_h``: Mamba2 mixers, attention alone, MLPs alone; V/O
at the full head size, every mixer at the rate's widest P and N) holds a KV cache for its attention
blocks only and one sequence's recurrent state for its mixers only, and a compute buffer the larger
of the two kinds'. Another hybrid (Bamba) has no GGUF export yet and is refused before anything is
planned or exported (``LlamaCppEngine.refusal``); the torch backend runs it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ... import ElastiqError
from ...checkpoint import Checkpoint
from ...families import checkpoint_family
from ...exporters.hybrid_archs import HYBRID_ARCHITECTURES, written_head_dim
from ...families.base import (ATTENTION, ATTENTION_KINDS, ATTN_K, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_UP,
                              ROPE_PAIRS, SSM_CONV_B, SSM_CONV_C, SSM_CONV_X, SSM_IN_B, SSM_IN_C, SSM_IN_X, SSM_IN_Z,
                              SSM_KINDS, SSM_NORM, SSM_OUT)
from ...quants import BLOCK, BLOCK_BYTES
from ..generate import PREFILL_CHUNK, CachedGenerator
from ..memory import Footprint, runtime_shapes, widest_mlp, widest_ssm
from .base import Backend, block_kinds, unsupported
from .exported import ExportEngine, export_path

LLAMA_CTX_PAD = 256  # llama.cpp rounds its KV cache up to a multiple of 256 cells
GGUF_ALIGNMENT = 32  # gguf-py pads each tensor's data to this
SCORING_BATCH = 512  # tokens per llama.cpp batch when every position's logits are kept


def _written_ssm(ckpt: Checkpoint, shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """The P and N every Mamba2 block is written at: the rate's widest, P as the architecture
    writes it (``exporters.hybrid_archs.written_head_dim``)."""
    family = checkpoint_family(ckpt)
    ssm = family.ssm_config(ckpt.config)
    P, N = widest_ssm(shapes, ssm)
    return written_head_dim(family.gguf[0], ckpt.config["hidden_size"], ssm.num_heads, P), N


def _gguf_tensors(ckpt: Checkpoint, shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """Bytes of the tensors ``write_gguf`` writes for a rate (pruned heads back at full size; a
    Mamba2 block at the P and N it is written at, ``_written_ssm``; every MLP at the widest where
    the architecture has one width; Q4_0, Q8_0 or F16 matrices, F32 vectors and convolutions, each
    padded to the alignment), and of the Q4_0 matrices a matmul uses (the ones llama.cpp repacks; a
    tied head is the embedding's). ``shapes``: the rate's ``runtime_shapes``."""
    config, heads = ckpt.config, ckpt.heads
    family = checkpoint_family(ckpt)
    full = {} if heads is None else {ATTN_Q: heads.num_heads * heads.head_dim,
                                     ATTN_K: heads.num_kv_heads * heads.head_dim,
                                     ATTN_V: heads.num_kv_heads * heads.head_dim}
    ssm = family.ssm_config(config)
    if ssm is not None:  # rows of every block at the P (per head) and N (per group) it is written at
        P, N = _written_ssm(ckpt, shapes)
        full.update({slot: ssm.num_heads * P for slot in (SSM_IN_Z, SSM_IN_X, SSM_CONV_X, SSM_NORM)})
        full.update({slot: ssm.n_groups * N for slot in (SSM_IN_B, SSM_IN_C, SSM_CONV_B, SSM_CONV_C)})
    if family.gguf[0] in HYBRID_ARCHITECTURES and HYBRID_ARCHITECTURES[family.gguf[0]].one_mlp_width:
        full.update({slot: widest_mlp(shapes, heads, ssm) for slot in (FFN_GATE, FFN_UP)})
    total = matmul = 0
    for name, (shape, _, fmt) in shapes.items():
        if name.endswith(ROPE_PAIRS):
            continue  # consumed by the full-size layout
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in full:
            shape = (full[parts[-2]], *shape[1:])
        elif len(parts) > 2 and parts[-2] == ATTN_OUT:
            shape = (shape[0], heads.num_heads * heads.head_dim)
        elif len(parts) > 2 and parts[-2] == SSM_OUT:
            shape = (shape[0], full[SSM_IN_X])
        elif len(parts) > 2 and parts[-2] == FFN_DOWN and FFN_UP in full:
            shape = (shape[0], full[FFN_UP])
        numel = math.prod(shape)
        nbytes = numel // BLOCK * BLOCK_BYTES[fmt] if fmt else numel * (2 if len(shape) == 2 else 4)
        total += -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
        used_by_matmul = name != "embed_tokens.weight" or config.get("tie_word_embeddings")
        if fmt == "q4_0" and len(shape) == 2 and shape[0] % 8 == 0 and used_by_matmul:
            matmul += nbytes
    return total, matmul


def _gguf_vocab(ckpt: Checkpoint, vocab_size: int) -> int:
    """Bytes of the tokenizer metadata ``write_gguf`` adds: every token (a length-prefixed string and
    an int32 type; ids the tokenizer lacks become short pad names), then the merges of a byte-level
    BPE tokenizer or a float32 score per token of a SentencePiece-style one, and the chat template."""
    spec = json.loads((ckpt.path / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = {i: t for t, i in spec["model"].get("vocab", {}).items()}
    tokens.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    total = sum(8 + 4 + len(tokens.get(i, f"[PAD{i}]").encode()) for i in range(vocab_size))
    if spec["model"].get("byte_fallback"):
        total += 4 * vocab_size
    else:
        merges = spec["model"].get("merges", [])
        total += sum(8 + len((m if isinstance(m, str) else " ".join(m)).encode()) for m in merges)
    return total + len((ckpt.source.chat_template or "").encode())


def _repacks_q4_0() -> bool:
    """Whether this llama.cpp build repacks Q4_0 weights for its CPU matmul kernels."""
    import llama_cpp

    return b"REPACK = 1" in llama_cpp.llama_print_system_info()


def footprint(ckpt: Checkpoint, rate: float, ctx: int, baseline: int, **_) -> Footprint:
    """What llama.cpp holds for ``rate`` with ``ctx`` positions on top of ``baseline`` bytes (above)."""
    if (why := LlamaCppEngine.refusal(ckpt)) is not None:
        raise ElastiqError(why)
    config = ckpt.config
    heads, vocab, hidden = ckpt.heads, config["vocab_size"], config["hidden_size"]
    path = export_path(ckpt, rate, LlamaCppEngine.format)
    shapes = runtime_shapes(ckpt, rate)
    tensors, matmul = _gguf_tensors(ckpt, shapes)
    file_bytes = path.stat().st_size if path.is_file() else tensors + _gguf_vocab(ckpt, vocab)
    weights = file_bytes + (matmul if _repacks_q4_0() else 0)
    ubatch = min(ctx, PREFILL_CHUNK)
    family = checkpoint_family(ckpt)
    kinds = family.layer_kinds(config)
    ssm = family.ssm_config(config)
    kv = workspace = 0
    if heads is not None:  # the attention blocks' KV cache (a hybrid's others hold none)
        widest = widest_mlp(shapes, heads, ssm)
        cells = -(-ctx // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
        layers = sum(kind in ATTENTION_KINDS for kind in kinds)
        kv = cells * layers * 2 * heads.num_kv_heads * heads.head_dim * 2
        workspace = ubatch * 4 * max(vocab + hidden, 2 * heads.num_heads * cells + 3 * hidden + 3 * widest)
    if ssm is not None:  # the Mamba2 blocks' recurrent states
        state, buffer = _recurrent(ckpt, shapes, sum(kind in SSM_KINDS for kind in kinds), ubatch)
        kv, workspace = kv + state, max(workspace, buffer)
    return Footprint(rate, weights, kv, workspace + vocab * 4, baseline)  # and the output buffer of one token's logits


def _recurrent(ckpt: Checkpoint, shapes: Mapping[str, tuple], layers: int, ubatch: int) -> tuple[int, int]:
    """The recurrent state and the compute buffer of ``layers`` Mamba2 blocks in llama.cpp's
    ``mamba2`` or ``nemotron_h``, at the rate's widest P and N: per block, one sequence's float32
    convolution inputs (K - 1 steps of x, B and C) and SSM state (H x P x N), whatever the context;
    a compute buffer for a batch of ``ubatch`` tokens whose every logit is an output, or of the
    block's input projection, whichever is larger (the output buffer of one token's logits apart)."""
    config = ckpt.config
    ssm = checkpoint_family(ckpt).ssm_config(config)
    P, N = _written_ssm(ckpt, shapes)
    H, G, K = ssm.num_heads, ssm.n_groups, ssm.conv_kernel
    state = layers * 4 * ((K - 1) * (H * P + 2 * G * N) + H * P * N)
    projection = 2 * H * P + 2 * G * N + H
    return state, ubatch * 4 * max(config["vocab_size"] + config["hidden_size"], 2 * projection)


class LlamaCppGenerator(CachedGenerator):
    """Generation through a ``llama_cpp.Llama``: its ``n_tokens`` is moved back to the reused prefix,
    and ``eval`` drops the cache beyond it before running the new tokens. A recurrent model's state
    (llama.cpp's ``mamba2``, and a hybrid's such as ``nemotron_h``, whose attention blocks' KV cache
    could go back but whose mixers' states cannot) goes on only from the position it reached."""

    def __init__(self, llm, max_seq: int):
        import llama_cpp

        super().__init__(max_seq)
        self.llm = llm
        hybrid = getattr(llama_cpp, "llama_model_is_hybrid", lambda _: False)  # llama-cpp-python >= 0.3.10
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(llm.model) or hybrid(llm.model))

    def _resumable(self, start: int) -> bool:
        return not self.recurrent or start == self.llm.n_tokens

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        import llama_cpp

        self.llm.n_tokens = start
        self.llm.eval(tokens)
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).copy())

    def reset(self) -> None:
        super().reset()
        self.llm.reset()


class LlamaCppEngine(ExportEngine):
    """The rate's GGUF export run by llama.cpp (llama-cpp-python), with a KV cache of ``ctx`` positions."""

    backend, format, requires = "llama.cpp", "gguf", ("llama_cpp", "llama-cpp-python")

    @staticmethod
    def refusal(ckpt: Checkpoint) -> str | None:
        """What the GGUF export writes runs: models of attention + MLP blocks (``llama`` and its kin),
        of Mamba2 blocks alone (``mamba2``), and the hybrids of Nemotron-H (``nemotron_h``), Bamba
        (``granitehybrid``) and Falcon-H1 (``falcon-h1``)."""
        kinds, arch = block_kinds(ckpt), checkpoint_family(ckpt).gguf[0]
        if kinds <= {ATTENTION} or (arch in HYBRID_ARCHITECTURES and kinds <= HYBRID_ARCHITECTURES[arch].kinds):
            return None
        return unsupported("llama.cpp", ckpt, "models of attention + MLP blocks, of Mamba2 blocks alone, and "
                           "Nemotron-H, Bamba and Falcon-H1 hybrids (llama.cpp's nemotron_h, granitehybrid, falcon-h1)",
                           "--backend torch")

    def _load(self, path: Path) -> LlamaCppGenerator:
        llm = self.package.Llama(str(path), n_ctx=self.ctx, n_threads=self.threads, n_threads_batch=self.threads,
                                 n_batch=min(self.ctx, SCORING_BATCH if self.scoring else PREFILL_CHUNK),
                                 logits_all=self.scoring, verbose=False)
        return LlamaCppGenerator(llm, self.ctx)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.scoring:
            raise ElastiqError("this llama.cpp engine keeps only the last logits; open it with scoring=True")
        llm, out = self.generator.llm, []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:len(row)], dtype=np.float32)))
        self.generator.reset()  # the cached tokens are the last row's, not a conversation's
        return torch.stack(out)

    def _close(self) -> None:
        if self.generator is not None:
            self.generator.llm.close()
        super()._close()


def _open(checkpoint, rate: float, ctx: int, tokenizer=None, scoring: bool = False, **_) -> LlamaCppEngine:
    return LlamaCppEngine(checkpoint, rate, ctx, tokenizer=tokenizer, scoring=scoring)


BACKEND = Backend("llama.cpp", LlamaCppEngine.requires, footprint, _open, LlamaCppEngine.format)

"""One rate of a nested checkpoint as an ONNX decoder with KV cache, for onnxruntime.

The graph is written node by node with ``onnx.helper`` rather than traced, because every layer has
its own widths and the graph should say plainly what it computes. It follows
``elastiq.modeling.model`` exactly:

- inputs ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value``;
  outputs ``logits`` and ``present.N.key/value`` (optimum's names), caches laid out
  [batch, kv_heads, seq, head] with a head of 2u channels in K and r in V, per layer;
- RoPE on q/k heads of 2u channels in the rotate-half layout (channel i pairs with i + u), kept pair
  i of KV group g turning at ``inv_freq[rope_pairs[g, i]]``, cos/sin times the runtime's
  ``attention_scaling``; grouped-query attention scaled by 1/sqrt(original head size);
- a 4-bit matrix becomes one com.microsoft ``MatMulNBits`` (bits 4, block 32, no zero points, so
  onnxruntime's default zero point of 8 gives Q4_0's w = d * (q - 8)) whose B is
  ``quants.matmulnbits`` of the checkpoint's codes and whose scales are its fp16 scales as float32
  (exact; the op wants the activations' type). A 4-bit embedding stays 4-bit: com.microsoft
  ``GatherBlockQuantized`` reads the same B (viewed as [vocab, blocks, 16] with the quantized axis
  last), so a tied LM head and embedding share one initializer. An 8-bit (Q8_0) embedding and head
  use the same two ops with bits 8, B being the codes plus 128 (``quants.matmulnbits_q8``) for
  the default zero point of 128;
- a float matrix is a ``Gemm`` with transB=1, so weights keep their [out, in] layout and a tied
  float embedding is stored once.

The residual stream flows as [batch * seq, hidden]; computation is float32 throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .. import ElastiqError, __version__
from ..atomic import atomic_path
from ..checkpoint import Checkpoint
from ..families import checkpoint_family
from ..families.base import (ATTENTION, ATTENTION_ONLY, ATTN_K, ATTN_K_NORM, ATTN_NORM, ATTN_OUT, ATTN_POST_NORM,
                             ATTN_Q, ATTN_Q_NORM, ATTN_V, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_POST_NORM, FFN_UP, MLP_ONLY,
                             ROPE_PAIRS, SSM_KINDS)
from ..modeling.model import ModelArgs, layer_attention, rope_parameters, runtime_weights
from ..quants import BLOCK, Q8Tensor, Quantized, matmulnbits, matmulnbits_q8
from .hybrid_archs import HYBRID_ARCHITECTURES
from .hf import SSM_FIELDS

OPSET = 21
IR_VERSION = 10  # the IR of opset 21; onnxruntime 1.30 reads IR versions up to 13
MS = "com.microsoft"
# RoPE types whose frequencies do not depend on the sequence length, so one table serves every step.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
MAX_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit for one file, less room for the graph


class OnnxExportError(ElastiqError):
    """A checkpoint, rate or output that cannot be exported to ONNX."""


def write_onnx(checkpoint: Path | str, rate: float, output: Path | str) -> Path:
    """Write rate ``rate`` of the nested checkpoint ``checkpoint`` to the ONNX file ``output``
    (a temporary sibling renamed into place; an existing file is replaced) and return its path."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise OnnxExportError(f"an ONNX export's file name must end in .onnx, got {output.name}")
    if output.is_dir():
        raise OnnxExportError(f"{output} is a directory; give the path of an .onnx file to write")
    ckpt = Checkpoint(checkpoint)
    ckpt.rate_entry(rate)  # a rate that is not offered fails here, listing the offered ones
    family = checkpoint_family(ckpt)  # its config and tensors describe one model
    kinds = set(family.layer_kinds(ckpt.config))
    if kinds != {ATTENTION}:  # Mamba2, or a hybrid's blocks (Nemotron-H, Bamba)
        has = [what for present, what in ((kinds & set(SSM_KINDS), "Mamba2 blocks (a recurrent scan)"),
                                          (ATTENTION_ONLY in kinds, "attention blocks without RoPE or MLP"),
                                          (MLP_ONLY in kinds, "ungated MLP blocks without attention")) if present]
        instead = ([f"export it to GGUF (--format gguf: llama.cpp's {family.gguf[0]})"]
                   if family.gguf[0] in HYBRID_ARCHITECTURES else [])
        instead += ["to Hugging Face (--format hf)"] if family.name in SSM_FIELDS else []
        raise OnnxExportError(f"the ONNX export builds blocks of attention + gated MLP only; a {family.name} model "
                              f"has {', '.join(has)}, which it does not build yet: "
                              f"{' or '.join(instead + ['run it with `elastiq run`'])}")
    model = build_model(ckpt.read_rate(rate), ckpt.config,
                        {"elastiq_version": __version__, "checkpoint": ckpt.path.name, "rate": str(rate)})
    _write_atomic(output, model.SerializeToString())
    return output


def build_model(weights: Mapping[str, torch.Tensor | Quantized], config: Mapping,
                metadata: Mapping[str, str] | None = None):
    """The ``onnx.ModelProto`` of one rate's ``weights`` (a checkpoint's names, as
    ``Checkpoint.read_rate`` returns them) and the Hugging Face config dict ``config``."""
    import onnx
    from onnx import TensorProto, helper

    _check_config(config)
    weights = runtime_weights(weights, config)
    args = ModelArgs.from_weights(weights, config)
    attending = layer_attention(config)
    size = sum(_nbytes(t) for t in {id(t): t for t in weights.values()}.values())
    if size > MAX_BYTES:
        raise OnnxExportError(f"the weights take {size / 2**30:.2f} GiB; a single-file ONNX export holds at most "
                              f"{MAX_BYTES / 2**30:.2f} GiB (external data is not written); export a smaller rate "
                              "or a 4-bit checkpoint")
    g = _Graph()
    G, Q = args.num_kv_heads, args.num_heads // args.num_kv_heads
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", args.vocab_size])]
    for i, layer in enumerate(args.layers):
        for kind, width in (("key", 2 * layer.rope_pairs), ("value", layer.v_rank)):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch_size", G, "past_sequence_length", width]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch_size", G, "total_sequence_length", width]))

    ids_shape = g.op("Shape", "input_ids")  # [B, T]
    x = _embed(g, weights["embed_tokens.weight"], g.op("Reshape", "input_ids", g.const([-1])))
    if args.embed_scale != 1:
        x = g.op("Mul", x, g.const(np.float32(args.embed_scale)))
    positions = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([1, 3]))  # [B,1,T,1]
    masks = {w: _attention_mask(g, ids_shape, w) for w in {a.window for a in attending}}
    for i, (layer, attend) in enumerate(zip(args.layers, attending)):
        p = f"layers.{i}."
        u, r = layer.rope_pairs, layer.v_rank
        pairs = weights.get(p + ROPE_PAIRS)
        pairs = torch.arange(u).expand(G, u) if pairs is None else pairs.long()
        freqs = attend.inv_freq.float()[pairs]  # [G, u]
        angles = g.op("Mul", positions, g.const(torch.cat((freqs, freqs), -1)[:, None, :]))  # [B, G, T, 2u]
        cos, sin = g.op("Cos", angles), g.op("Sin", angles)
        if attend.scaling != 1:
            cos, sin = (g.op("Mul", t, g.const(np.float32(attend.scaling))) for t in (cos, sin))

        h = _rms_norm(g, x, weights[p + ATTN_NORM + ".weight"], args.rms_norm_eps)
        q = _heads(g, _linear(g, weights, p + ATTN_Q, h), ids_shape, [G, Q, 2 * u], [0, 2, 3, 1, 4])
        k = _heads(g, _linear(g, weights, p + ATTN_K, h), ids_shape, [G, 2 * u], [0, 2, 1, 3])
        v = _heads(g, _linear(g, weights, p + ATTN_V, h), ids_shape, [G, r], [0, 2, 1, 3])
        if p + ATTN_Q_NORM + ".weight" in weights:  # per-head norms of q and k, before RoPE
            q = _rms_norm(g, q, weights[p + ATTN_Q_NORM + ".weight"], args.rms_norm_eps)
            k = _rms_norm(g, k, weights[p + ATTN_K_NORM + ".weight"], args.rms_norm_eps)
        q = _rope(g, q, g.op("Unsqueeze", cos, g.const([2])), g.op("Unsqueeze", sin, g.const([2])))
        k = _rope(g, k, cos, sin)
        keys = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
        values = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
        keys_t = g.op("Unsqueeze", g.op("Transpose", keys, perm=[0, 1, 3, 2]), g.const([2]))  # [B, G, 1, 2u, S]
        scores = g.op("Mul", g.op("MatMul", q, keys_t), g.const(np.float32(args.attention_scale)))  # [B,G,Q,T,S]
        scores = g.op("Where", masks[attend.window], scores, g.const(np.float32(np.finfo(np.float32).min)))
        y = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", values, g.const([2])))  # [B,G,Q,T,r]
        y = g.op("Reshape", g.op("Transpose", y, perm=[0, 3, 1, 2, 4]), g.const([-1, G * Q * r]))
        x = g.op("Add", x, _post_norm(g, weights, p + ATTN_POST_NORM, _linear(g, weights, p + ATTN_OUT, y), args))

        h = _rms_norm(g, x, weights[p + FFN_NORM + ".weight"], args.rms_norm_eps)
        gate = _linear(g, weights, p + FFN_GATE, h)
        if args.hidden_act == "silu":
            gate = g.op("Mul", gate, g.op("Sigmoid", gate))
        else:  # gelu_pytorch_tanh
            gate = g.op("Gelu", gate, approximate="tanh")
        act = g.op("Mul", gate, _linear(g, weights, p + FFN_UP, h))
        x = g.op("Add", x, _post_norm(g, weights, p + FFN_POST_NORM, _linear(g, weights, p + FFN_DOWN, act), args))

    h = _rms_norm(g, x, weights["norm.weight"], args.rms_norm_eps)
    head = "embed_tokens" if args.tie_word_embeddings else "lm_head"
    logits = _linear(g, weights, head, h)
    g.op("Reshape", logits, g.op("Concat", ids_shape, g.const([args.vocab_size]), axis=0), out="logits")

    graph = helper.make_graph(g.nodes, "elastiq-decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="elastiq", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
    if metadata:
        helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    return model


class _Graph:
    """Nodes and initializers of a graph under construction, with unique value names."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._shared: dict[tuple[int, str], str] = {}

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs) -> str:
        """Add one node; return the name of its (single) output."""
        return self.op_n(op_type, 1, *inputs, out=out, domain=domain, **attrs)[0]

    def op_n(self, op_type: str, n: int, *inputs: str, out: str | None = None, domain: str = "",
             **attrs) -> list[str]:
        """Add one node of ``n`` outputs; return their names."""
        from onnx import helper

        out = out or self._name(op_type)
        outs = [out] + [f"{out}.{j}" for j in range(1, n)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=out, domain=domain or None, **attrs))
        return outs

    def const(self, value, name: str | None = None) -> str:
        """An initializer of ``value`` (a tensor, an array, a list of ints as int64, or a scalar)."""
        from onnx import numpy_helper

        if isinstance(value, torch.Tensor):
            value = value.numpy()
        elif isinstance(value, list):
            value = np.array(value, dtype=np.int64)
        name = name or self._name("const")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(self, tensor: torch.Tensor, name: str, part: str, make) -> str:
        """The initializer ``name`` of ``make()``, created once per (tensor, part), so that a tied
        tensor is stored once."""
        key = (id(tensor), part)
        if key not in self._shared:
            self._shared[key] = self.const(make(), name)
        return self._shared[key]


def _check_config(config: Mapping) -> None:
    for layer_type in set(config.get("layer_types") or [None]):
        params = rope_parameters(config, layer_type)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in STATIC_ROPE:
            raise OnnxExportError(f"RoPE type {rope_type!r} is not supported by the ONNX export (its frequencies "
                                  f"depend on the sequence length); supported: {', '.join(STATIC_ROPE)}")


def _nbytes(t: torch.Tensor | Quantized) -> int:
    if isinstance(t, Quantized):
        return t.codes.numel() + 4 * t.scales.numel()
    return t.numel() * 4


def _embed(g: _Graph, table: torch.Tensor | Quantized, ids: str) -> str:
    """Hidden states [N, hidden] of the flat token ids ``ids``: a Gather of a float table, or a
    GatherBlockQuantized of the 4- or 8-bit one (the same B and scales as its MatMulNBits)."""
    name = "embed_tokens.weight"
    if not isinstance(table, Quantized):
        return g.op("Gather", g.weight(table, name, "float", lambda: table.float()), ids)
    b, scales, bits = _quantized_initializers(g, table, name)
    rows = g.op("GatherBlockQuantized", b, ids, g.op("Unsqueeze", scales, g.const([2])), domain=MS,
                bits=bits, block_size=BLOCK, gather_axis=0, quantize_axis=2)  # [N, blocks, 32]
    return g.op("Reshape", rows, g.const([-1, table.shape[1]]))


def _quantized_initializers(g: _Graph, t: Quantized, name: str) -> tuple[str, str, int]:
    """The B and float32 scales initializers of a Q4_0 or Q8_0 matrix, and its bits."""
    if isinstance(t, Q8Tensor):
        b, bits = g.weight(t.codes, f"{name}.matmulnbits", "B", lambda: matmulnbits_q8(t.codes)), 8
    else:
        b, bits = g.weight(t.codes, f"{name}.matmulnbits", "B", lambda: matmulnbits(t.codes)), 4
    return b, g.weight(t.scales, f"{name}.scales", "scales", lambda: t.scales.float()), bits


def _linear(g: _Graph, weights: Mapping, prefix: str, x: str) -> str:
    """``x`` [N, in] times the transposed weight ``prefix.weight`` [out, in], plus its bias if any."""
    w, bias = weights[prefix + ".weight"], weights.get(prefix + ".bias")
    if isinstance(w, Quantized):
        b, scales, bits = _quantized_initializers(g, w, prefix + ".weight")
        n, k = w.shape
        y = g.op("MatMulNBits", x, b, scales, domain=MS, K=k, N=n, bits=bits, block_size=BLOCK)
        return y if bias is None else g.op("Add", y, g.weight(bias, prefix + ".bias", "float", lambda: bias.float()))
    inputs = [x, g.weight(w, prefix + ".weight", "float", lambda: w.float())]
    if bias is not None:
        inputs.append(g.weight(bias, prefix + ".bias", "float", lambda: bias.float()))
    return g.op("Gemm", *inputs, transB=1)


def _post_norm(g: _Graph, weights: Mapping, prefix: str, x: str, args: ModelArgs) -> str:
    """``x`` through the norm ``prefix`` on a branch's output, where the block has one (Gemma)."""
    weight = weights.get(prefix + ".weight")
    return x if weight is None else _rms_norm(g, x, weight, args.rms_norm_eps)


def _rms_norm(g: _Graph, x: str, weight: torch.Tensor, eps: float) -> str:
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, g.const(np.float32(eps)))))
    return g.op("Mul", g.const(weight.float()), g.op("Mul", x, inv))


def _heads(g: _Graph, x: str, ids_shape: str, head_shape: list[int], perm: list[int]) -> str:
    """[N, heads * dim] -> [B, T, *head_shape], transposed by ``perm`` (sequence before channels)."""
    shape = g.op("Concat", ids_shape, g.const(head_shape), axis=0)
    return g.op("Transpose", g.op("Reshape", x, shape), perm=perm)


def _rope(g: _Graph, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin on the last axis (channel i pairs with i + u)."""
    first, second = g.op_n("Split", 2, x, axis=-1, num_outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _attention_mask(g: _Graph, ids_shape: str, window: int | None = None) -> str:
    """Bool [B, 1, 1, T, S]: query t (at cache index past + t) sees key s when s <= past + t,
    past + t - s < ``window`` (when there is one) and ``attention_mask[b, s]`` is 1."""
    from onnx import TensorProto

    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(np.int64(1)))
    past = g.op("Sub", total, g.op("Gather", ids_shape, g.const(np.int64(1))))
    one = g.const(np.int64(1))
    key_index = g.op("Range", g.const(np.int64(0)), total, one)  # [S]
    query_index = g.op("Unsqueeze", g.op("Range", past, total, one), g.const([1]))  # [T, 1]
    causal = g.op("LessOrEqual", key_index, query_index)  # [T, S]
    if window is not None:
        causal = g.op("And", causal, g.op("Greater", key_index, g.op("Sub", query_index, g.const(np.int64(window)))))
    padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2, 3]))
    return g.op("And", causal, padding)


def _write_atomic(output: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``output`` and rename it into place."""
    try:
        with atomic_path(output) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise OnnxExportError(f"cannot write {output}: {err.strerror or err}") from None

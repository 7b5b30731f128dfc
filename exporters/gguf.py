"""GGUF export of one rate of a nested checkpoint, for llama.cpp.

llama.cpp keeps one head size for every layer, so a pruned head is written back at full size:
kept rotary pair i of KV group g returns to its original pair ``rope_pairs[g, i]`` (channels p and
p + d/2 of the rotate-half layout) and the pruned pairs become zero rows; a head's V/O rank keeps
its first r channels and the tail becomes zero rows of v and zero input columns of the output
projection. Zero channels add nothing to q.k or to the output, so the model is the same. Q/K rows
then take the layout of the family's llama.cpp architecture (``Family.gguf``): interleaved pairs,
the permutation llama.cpp's Hugging Face converter applies, for ``llama``; rotate-half as it is for
NeoX-style ones such as ``qwen3``. MLP widths differ per layer, which ``llama`` cannot say: such
a rate is written as ``deci`` with a per-layer ``feed_forward_length``; a family with no such
architecture in llama.cpp (``qwen3``) gets every block's MLP zero-padded to the widest one's.
Models with Mamba2 blocks are written as llama.cpp's ``mamba2`` (Mamba2 alone), ``nemotron_h``
(Nemotron-H: per-layer MLP widths kept; V/O rank, SSM channels per head and states per group
widened with zeros), ``granitehybrid`` (Bamba: MLPs, q/k pairs, V/O rank, P and N widened with
zeros; q/k interleaved, which puts the pairs partial RoPE turns in the channels llama.cpp turns
and those it passes after them, ``families.partial_rope``) or ``falcon-h1`` (Falcon-H1: MLPs, V/O
rank, P and N widened with zeros; q/k rotate-half), as ``_write_hybrid`` says.

4-bit matrices are copied as GGUF ``Q4_0`` blocks from the checkpoint's codes, bit for bit (a
zero row or column is blocks of scale 0), and 8-bit ones (value projections, embedding, head) as ``Q8_0`` blocks;
float checkpoints are written as F16 (or F32); norms and biases as F32. The file is written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import gguf
import numpy as np
import torch

from .. import ElastiqError
from ..atomic import atomic_path
from ..checkpoint import Checkpoint
from ..families import checkpoint_family
from ..families.base import (ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, EMBED, FINAL_NORM, HEAD, ROPE_PAIRS, SSM_A,
                             SSM_CONV, SSM_CONV_X, SSM_D, SSM_DT, SSM_IN, SSM_NORM, SSM_OUT)
from ..modeling.model import (BRANCH_TENSORS, LayerArgs, ModelArgs, SSMLayerArgs, attends, layer_windows,
                              rope_parameters, rotary_frequencies, runtime_weights)
from ..quants import Q8Tensor, QuantizedTensor, gguf_blocks, gguf_q8_0_blocks
from .hf import qk_rows as half_rows
from .hybrid_archs import HYBRID_ARCHITECTURES, written_head_dim
from .padding import head_prefix, scatter_columns, scatter_rows, ssm_widest, widest_mlp

FLOAT_TYPES = {"f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
               "f32": (np.float32, gguf.LlamaFileType.ALL_F32)}
# Qwen2's pre-tokenizer split, which llama.cpp's "qwen2" pre-tokenizer implements
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
TOP = {EMBED: "token_embd", FINAL_NORM: "output_norm", HEAD: "output"}  # llama.cpp's names


class ExportError(ElastiqError):
    """A checkpoint, rate or output path that cannot be exported as asked."""


# --- pruned heads back to full size ---------------------------------------------------------------

Weight = torch.Tensor | QuantizedTensor | Q8Tensor


def qk_rows(pairs: torch.Tensor, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """Full-size interleaved row of each q (or k, with ``heads_per_group`` 1) row of a pruned head.

    Pruned row h*2u + s*u + i is half s of kept pair i of head h (KV group g = h // heads_per_group);
    that pair is original pair p = pairs[g, i], which llama.cpp's interleaved layout keeps at
    channels 2p and 2p + 1 of the head."""
    G, u = pairs.shape
    h = torch.arange(G * heads_per_group)
    rows = h[:, None, None] * head_dim + 2 * pairs.long()[h // heads_per_group][:, None, :] + torch.arange(2)[:, None]
    return rows.reshape(-1)


def full_heads(weights: Mapping[str, Weight], args: ModelArgs, neox: bool = False) -> dict[str, Weight]:
    """``weights`` (runtime names, one rate) with every attention projection at full head size in
    llama.cpp's layout (rotary pairs interleaved, or halves kept with ``neox``), and the
    ``rope_pairs`` tensors consumed (a Mamba2 block's attention beside its mixer too: Falcon-H1's).
    Blocks without attention (a hybrid's) are left as they are;
    where the family has no RoPE, q and k hold every channel in order and ``neox`` keeps it. With
    partial RoPE laid out whole (``families.partial_rope``), interleaving puts pair p at channels
    2p and 2p + 1: inside the channels llama.cpp's RoPE turns exactly for the pairs that turn."""
    rows_of = half_rows if neox else qk_rows
    H, G, d = args.num_heads, args.num_kv_heads, args.head_dim
    out = dict(weights)
    for i, layer in enumerate(args.layers):
        if (layer := attends(layer)) is None:
            continue
        p = f"layers.{i}."
        u, r = layer.rope_pairs, layer.v_rank
        pairs = out.pop(p + ROPE_PAIRS, None)
        pairs = torch.arange(u).expand(G, u) if pairs is None else pairs.long()
        if pairs.shape != (G, u) or (pairs < 0).any() or (pairs >= d // 2).any() or any(
                len(set(row.tolist())) != u for row in pairs):
            raise ExportError(f"layer {i}: rope_pairs must hold {u} distinct pair indices below {d // 2} for "
                              f"each of the {G} KV heads, got {pairs.tolist()}")
        q_rows, k_rows = rows_of(pairs, H // G, d), rows_of(pairs, 1, d)
        rows = {ATTN_Q: (q_rows, H * d), ATTN_K: (k_rows, G * d), ATTN_V: (head_prefix(G, r, d), G * d)}
        for slot, (index, total) in rows.items():
            for kind in ("weight", "bias"):
                if (name := f"{p}{slot}.{kind}") in out:
                    out[name] = scatter_rows(out[name], index, total)
        name = f"{p}{ATTN_OUT}.weight"
        out[name] = scatter_columns(out[name], head_prefix(H, r, d), H * d)
    return out


def _cat_rows(parts: list[Weight], name: str) -> Weight:
    """Matrices stacked by rows: float ones, or quantized ones of one format (their codes and scales)."""
    kinds = {type(t) for t in parts}
    if len(kinds) > 1:
        raise ExportError(f"{name} is fused from parts stored in different formats ({', '.join(sorted(k.__name__ for k in kinds))}); "
                          "llama.cpp holds it as one matrix: quantize every part alike (no --q8 on a part of it)")
    if kinds <= {torch.Tensor, torch.nn.Parameter}:
        return torch.cat(parts)
    return type(parts[0])(torch.cat([t.codes for t in parts]), torch.cat([t.scales for t in parts]))


def ssm_gguf_tensors(weights: Mapping[str, Weight], layers: Iterable[int], groups: int,
                     arch: str = "mamba2") -> dict[str, Weight]:
    """llama.cpp's Mamba2 tensors (of its ``mamba2`` or ``nemotron_h``, named ``arch`` in errors)
    of the blocks ``layers`` of ``weights`` (runtime names, every Mamba2 block at one width), by
    their GGUF names: the block's norm, the split projections and convolutions fused back
    (``ssm_in`` rows z, x, B, C, dt; ``ssm_conv1d`` channels x, B, C as [channels, K], its bias
    zero where the model has none, since llama.cpp always adds one), A = -exp(A_log) and D as
    [H, 1], dt_bias as ``ssm_dt.bias``, and the gated norm's weight as [groups, channels per group]
    (none where the mixer is gated without a norm, Falcon-H1's: llama.cpp then computes y * silu(z))."""
    out = {}
    for i in layers:
        w = lambda slot, kind="weight": weights.get(f"layers.{i}.{slot}.{kind}")  # noqa: E731
        if any(w(slot, "bias") is not None for slot in (*SSM_IN, SSM_OUT)):
            raise ExportError(f"llama.cpp's {arch} has no biases on its input and output projections (a Mamba2 "
                              "mixer's in_proj and out_proj); this model has them (use_bias), so it cannot be written "
                              "to GGUF")
        b = f"blk.{i}."
        out[b + "attn_norm.weight"] = weights[f"layers.{i}.{ATTN_NORM}.weight"]
        out[b + "ssm_in.weight"] = _cat_rows([w(slot) for slot in SSM_IN], b + "ssm_in")
        conv = torch.cat([w(slot) for slot in SSM_CONV])[:, 0]
        out[b + "ssm_conv1d.weight"] = conv
        out[b + "ssm_conv1d.bias"] = (torch.cat([w(slot, "bias") for slot in SSM_CONV])
                                      if w(SSM_CONV_X, "bias") is not None else conv.new_zeros(conv.shape[0]))
        out[b + "ssm_dt.bias"] = weights[f"layers.{i}.{SSM_DT}"]
        out[b + "ssm_a"] = -torch.exp(weights[f"layers.{i}.{SSM_A}"].float())[:, None]
        out[b + "ssm_d"] = weights[f"layers.{i}.{SSM_D}"][:, None]
        if w(SSM_NORM) is not None:
            out[b + "ssm_norm.weight"] = w(SSM_NORM).reshape(groups, -1)
        out[b + "ssm_out.weight"] = w(SSM_OUT)
    return out


# --- tokenizer -----------------------------------------------------------------------------------

def _byte_level(spec: Mapping) -> bool:
    return spec.get("type") == "ByteLevel" and not spec.get("add_prefix_space") and spec.get("use_regex", True)


def pre_tokenizer_name(spec: Mapping | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a Hugging Face byte-level BPE pre-tokenizer:
    read off its structure, so a tokenizer trained anew gets the same name as the one it copies."""
    if spec and _byte_level(spec):
        return "gpt-2"  # the GPT-2 regex, then bytes to unicode
    parts = (spec or {}).get("pretokenizers", [])
    if (spec or {}).get("type") == "Sequence" and len(parts) == 2 and _byte_level(parts[1]) \
            and parts[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"  # every digit alone, then the GPT-2 regex
    if (spec or {}).get("type") == "Sequence" and len(parts) == 2 and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and parts[0].get("type") == "Split" \
            and parts[0].get("pattern") == {"Regex": QWEN2_REGEX} and parts[0].get("behavior") == "Isolated":
        return "qwen2"
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(spec)} has no llama.cpp equivalent here; "
                      "accepted: ByteLevel with the GPT-2 regex (gpt-2), individual Digits then that ByteLevel "
                      "(smollm), Qwen2's Split then ByteLevel (qwen2)")


def add_vocab(writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab_size: int) -> None:
    """Tokenizer metadata as llama.cpp's converters write it: a GPT-2 style byte-level BPE tokenizer
    (``gpt2``: tokens with their types, merges), or a SentencePiece-style BPE one with byte
    fallback, as Llama 2, Mistral, Gemma and Phi-3 have (``llama``: tokens with scores and types);
    then the special token ids, whether BOS/EOS are added, and the chat template."""
    tok = ckpt.tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {i: t for t, i in tok.get_vocab().items()}
    if max(vocab) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(vocab)}, the model's vocabulary only {vocab_size}")
    if spec["model"]["type"] == "BPE" and spec["model"].get("byte_fallback"):
        merges = _add_sentencepiece_vocab(writer, tok, spec, vocab, vocab_size)
    else:
        _add_byte_level_vocab(writer, tok, spec, vocab, vocab_size)
        merges = True
    special = gguf.SpecialVocab(ckpt.path, load_merges=merges, n_vocab=vocab_size)
    special.chat_template = ckpt.source.chat_template or special.chat_template
    plain, marked = tok.encode("a", add_special_tokens=False), tok.encode("a")  # what encoding adds, measured
    special.add_special_token["bos"] = len(marked) > len(plain) and marked[0] == tok.bos_token_id
    special.add_special_token["eos"] = len(marked) > len(plain) and marked[-1] == tok.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def _add_byte_level_vocab(writer: gguf.GGUFWriter, tok, spec: Mapping, vocab: Mapping[int, str],
                          vocab_size: int) -> None:
    # llama.cpp normalizes nothing; NFC (Qwen2's) is dropped as its converter drops it, which
    # changes nothing for text that is already NFC, as most text is
    if spec["model"]["type"] != "BPE" or spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise ExportError(f"only BPE tokenizers (byte-level with no normalizer or NFC, or SentencePiece-style with "
                          f"byte fallback) can be written to GGUF; this one is {spec['model']['type']} with normalizer "
                          f"{json.dumps(spec.get('normalizer'))}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = vocab[i] if added[i].normalized else tok.decode(tok.encode(vocab[i], add_special_tokens=False))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, tok, spec: Mapping, vocab: Mapping[int, str],
                             vocab_size: int) -> bool:
    """A SentencePiece-style BPE tokenizer (spaces as "▁", unknown bytes as ``<0xXX>`` tokens) as
    llama.cpp's ``llama`` tokenizer. That tokenizer merges the adjacent pair whose joined token
    scores highest; transformers applies the merge of lowest rank: a token's score is minus the
    rank of the merge that makes it, so both merge in the same order. (llama.cpp's own converter
    reads SentencePiece's scores from ``tokenizer.model``, which a checkpoint does not carry.)
    Returns False: llama.cpp takes no merges list for it."""
    normalizers = spec.get("normalizer") or {}
    steps = normalizers.get("normalizers", [normalizers]) if normalizers else []
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in steps)
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        prepend = pre.get("prepend_scheme", "always") != "never"
    elif pre or any(n.get("type") not in ("Prepend", "Replace") for n in steps):
        raise ExportError(f"this SentencePiece-style tokenizer (pre-tokenizer {json.dumps(pre)}, normalizer "
                          f"{json.dumps(normalizers)}) has no llama.cpp equivalent here; accepted: spaces replaced "
                          "by \u2581 (and a leading one prepended), or a Metaspace pre-tokenizer")
    score: dict[str, float] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        score.setdefault(left + right, -float(rank))
    added = tok.added_tokens_decoder
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = vocab.get(i, f"[PAD{i}]")
        tokens.append(text)
        scores.append(score.get(text, 0.0))
        if i not in vocab:
            types.append(gguf.TokenType.UNUSED)
        elif text == spec["model"].get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif byte.fullmatch(text):  # a fallback byte, even where the tokenizer lists it among its added tokens
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prepend)
    return False


# --- the file ------------------------------------------------------------------------------------

def _writable(output: Path) -> Path:
    """``output`` as a file path whose folder exists."""
    if output.is_dir():
        raise ExportError(f"{output} is a directory; give the path of the .gguf file to write")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the folder of {output}: {err.strerror}") from None
    return output


def _array(t: Weight, float_type: type) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A tensor's GGUF data: Q4_0 or Q8_0 blocks copied from the codes, 1-d tensors in F32,
    matrices in ``float_type``."""
    if isinstance(t, QuantizedTensor):
        rows = t.codes.shape[0]
        return gguf_blocks(t.codes, t.scales).reshape(rows, -1).numpy(), gguf.GGMLQuantizationType.Q4_0
    if isinstance(t, Q8Tensor):
        rows = t.codes.shape[0]
        return gguf_q8_0_blocks(t.codes, t.scales).reshape(rows, -1).numpy(), gguf.GGMLQuantizationType.Q8_0
    return t.float().numpy().astype(np.float32 if t.dim() == 1 else float_type), None


@functools.cache
def _tensor_names(arch: gguf.MODEL_ARCH) -> frozenset[str]:
    return frozenset(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch])


def gguf_name(runtime_name: str, arch: gguf.MODEL_ARCH) -> str:
    """llama.cpp's name of a tensor: a block's slots are llama.cpp's own names (``blk.{i}.{slot}``),
    the embedding, final norm and head are named in ``TOP``; an error when ``arch`` has no such tensor."""
    if runtime_name.startswith("layers."):
        _, layer, slot, param = runtime_name.split(".")
        generic, name = f"blk.{{bid}}.{slot}", f"blk.{layer}.{slot}"
    else:
        slot, param = runtime_name.split(".")
        generic = name = TOP[slot]
    if generic not in _tensor_names(arch):
        raise ExportError(f"tensor {runtime_name} has no GGUF name in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} "
                          "architecture; this model cannot be written to GGUF")
    return f"{name}.{param}"


def _write_hybrid(ckpt: Checkpoint, rate: float, output: Path, float_type: str, weights: Mapping[str, Weight],
                  args: ModelArgs, family) -> Path:
    """``write_gguf`` of a model whose blocks are not each attention + MLP: llama.cpp's ``mamba2``
    (Mamba2 blocks alone), ``nemotron_h`` (blocks of one branch each: a Mamba2 mixer, attention
    without RoPE, or an ungated ReLU² MLP), ``granitehybrid`` (Bamba: every block a Mamba2 mixer
    or attention with partial RoPE, then a SwiGLU MLP) or ``falcon-h1`` (every block attention and
    a Mamba2 mixer side by side on one normed input, then a SwiGLU MLP).

    What the file keeps per layer: both hybrids read each block's kind from the per-layer
    ``attention.head_count_kv`` (the KV heads of an attention block, 0 for a Mamba2 one);
    ``nemotron_h`` also reads each MLP's width from the per-layer ``feed_forward_length`` (0 where
    a block has none; with both 0 a block is a Mamba2 mixer), so every MLP keeps its own width.
    What they cannot keep: llama.cpp has one head size for keys and values and one SSM inner size
    and state size, so each attention block's V/O rank goes back to the full head size with zero
    rows of v and zero columns of the output projection (exact), and every Mamba2 block is widened
    to one number of channels per head P and states per group N (``ssm_widest``: exact in N, equal
    up to the gated norm's epsilon in P): the rate's widest, or for ``granitehybrid``, whose loader
    takes an inner size of 2 x hidden only, 2 x hidden / heads (the unpruned P of a Bamba with
    ``mamba_expand`` 2, as every Bamba is). ``granitehybrid`` also sizes every MLP by layer 0's
    ``feed_forward_length``, so its MLPs are zero-padded to the rate's widest (exact). Those zeros
    are stored. Its attention turns the first ``rope.dimension_count`` channels of each head as
    consecutive pairs (NORM RoPE): q and k rows are interleaved within those channels
    (``partial_rows``); its embedding, residual, attention and logit multipliers are left unset
    (none is applied), as Bamba has none.

    ``falcon-h1`` has one number of heads, KV heads and MLP channels (layer 0's) for every block,
    all of which hold attention: V/O rank back at the full head size, every MLP zero-padded to the
    rate's widest, every mixer widened to the rate's widest P and N (exact where the mixers are
    gated without a norm: llama.cpp's Mamba2 layer then computes y * silu(z), as the runtime does).
    Its RoPE turns whole heads by halves (NEOX): q and k rows go back to their original rotate-half
    pairs, as for Qwen3. Its converter folds Falcon-H1's muP multipliers into the weights and writes
    none, as intake does, so the file's weights are the checkpoint's. Its attention projections and
    output take no bias (its graph adds none), so a model with them is refused.

    llama.cpp's Mamba2 does not clamp its time steps: ``mamba2`` and ``granitehybrid`` refuse a
    model whose config limits them. Nemotron-H's mixers clamp dt below at ``time_step_min``
    (transformers and the runtime do); llama.cpp's ``nemotron_h``, as its own converter writes it,
    does not, so the file computes the model without that floor: the same wherever
    softplus(dt + dt_bias) stays above it; a step that falls below it takes its own smaller dt
    there (less than ``time_step_min`` apart), so the state and the logits that follow differ a little."""
    arch_name = family.gguf[0]
    mixers = {i for i, layer in enumerate(args.layers) if isinstance(layer, SSMLayerArgs)}
    if arch_name not in HYBRID_ARCHITECTURES or \
            not set(family.layer_kinds(ckpt.config)) <= HYBRID_ARCHITECTURES[arch_name].kinds:
        raise ExportError(f"a {family.name} model cannot be written to GGUF yet: only models of Mamba2 blocks alone "
                          "(llama.cpp's mamba2), Nemotron-H hybrids (llama.cpp's nemotron_h), Bamba hybrids "
                          "(llama.cpp's granitehybrid) and Falcon-H1 hybrids (llama.cpp's falcon-h1) are")
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    ssm = args.ssm or family.ssm_of(ckpt.config)  # a hybrid's file states the mixers' shape even without one
    layout = HYBRID_ARCHITECTURES[arch_name]
    granite = arch_name == "granitehybrid"
    widest = max((args.layers[i].head_dim for i in mixers), default=0)
    P = written_head_dim(arch_name, args.hidden_size, ssm.num_heads, widest if mixers else ssm.head_dim)
    if layout.inner_twice_hidden and (2 * args.hidden_size % ssm.num_heads or widest > P):
        raise ExportError(f"llama.cpp's {arch_name} holds Mamba2 blocks of inner size 2 x hidden "
                          f"({2 * args.hidden_size}) only; this rate's {ssm.num_heads} SSM heads of {widest} "
                          f"channels cannot be widened to it with zeros")
    N = ssm.state_size
    if mixers:
        weights, P, N = ssm_widest(weights, args, P)
    if arch_name != "nemotron_h" and ssm.time_step_limit != (0.0, math.inf):
        raise ExportError(f"this model limits its time steps to {list(ssm.time_step_limit)}; llama.cpp's {arch_name} "
                          "does not, so it would compute another model")
    falcon = arch_name == "falcon-h1"
    attention = [attends(layer) is not None for layer in args.layers]
    if falcon:
        if not all(attention):
            raise ExportError("llama.cpp's falcon-h1 runs attention beside the mixer in every block; a block of this "
                              "model has none")
        biased = sorted({slot for layer in args.layers for slot in attends(layer).biases
                         if slot in (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)})
        if biased:
            raise ExportError(f"llama.cpp's falcon-h1 adds no bias to attention's projections; this model has them "
                              f"({', '.join(biased)}: attention_bias), so it cannot be written to GGUF")
    if any(attention) and abs(args.attention_scale * args.head_dim ** 0.5 - 1) > 1e-6:
        raise ExportError(f"this {family.name} model scales q.k by {args.attention_scale:.6g}; llama.cpp scales it by "
                          f"1/sqrt(head size) = {args.head_dim ** -0.5:.6g}, so it cannot run this model")
    widths = [layer.intermediate_size for layer in args.layers]  # a Bamba Mamba2 block's MLP's too; 0: none
    if arch_name == "nemotron_h" and any(isinstance(layer, LayerArgs) and layer.mlp and not layer.intermediate_size
                                         for layer in args.layers):
        raise ExportError(f"a block of this rate keeps no MLP channel; llama.cpp's {arch_name} would read it as a "
                          "Mamba2 block")
    rotated, base = None, None
    if granite and any(attention):  # partial RoPE: the first `rotated` channels of each head turn
        inv_freq, _ = rotary_frequencies(ckpt.config)
        rotated = 2 * inv_freq.shape[0]
        base, factors = rope_factors(ckpt.config, rotated)
        if factors is not None:
            raise ExportError(f"RoPE parameters {ckpt.config.get('rope_parameters')} change the rotary frequencies; "
                              "llama.cpp's granitehybrid turns them at the default ones only")
    if falcon:  # whole heads turn, by halves
        base, factors = rope_factors(ckpt.config, args.head_dim)
        if factors is not None:
            raise ExportError(f"RoPE parameters {ckpt.config.get('rope_parameters')} change the rotary frequencies; "
                              "llama.cpp's falcon-h1 turns them at the default ones only")
    if layout.one_mlp_width:  # one MLP width: the widest
        weights = widest_mlp(weights, widths)
        widths = [max(widths)] * len(widths)
    # V/O rank at full head size; q, k as they are (no RoPE), by halves (falcon-h1) or interleaved (granitehybrid)
    weights = full_heads(weights, args, neox=not granite)
    tensors = {TOP[slot] + ".weight": weights[f"{slot}.weight"] for slot in (EMBED, FINAL_NORM, HEAD)
               if f"{slot}.weight" in weights and not (slot == HEAD and args.tie_word_embeddings)}
    tensors.update(ssm_gguf_tensors(weights, sorted(mixers), ssm.n_groups, arch_name))
    for name, t in weights.items():  # the other blocks' tensors and a Mamba2 block's MLP, by their slots' names
        if name.startswith("layers.") and (int(name.split(".")[1]) not in mixers
                                           or name.split(".", 2)[2] in BRANCH_TENSORS):
            tensors[gguf_name(name, arch)] = t
    if falcon:  # its loader names the MLP's norm without a suffix, as its converter's map writes it
        tensors = {re.sub(r"^(blk\.\d+\.ffn_norm)\.weight$", r"\1", name): t for name, t in tensors.items()}
    known = _tensor_names(arch)
    for name in tensors:
        generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", name).removesuffix(".weight").removesuffix(".bias")
        if generic not in known:
            raise ExportError(f"tensor {name} has no place in llama.cpp's {arch_name} architecture")
    dtype, file_type = FLOAT_TYPES[float_type]
    if any(isinstance(t, QuantizedTensor) for t in tensors.values()):
        file_type = gguf.LlamaFileType.MOSTLY_Q4_0
    n = len(args.layers)
    # a recurrent state has no trained length (llama.cpp's converter writes 2^20); attention was trained to the config's
    context = (ckpt.config.get("max_position_embeddings") if any(attention) else None) or 2 ** 20

    def header(writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(n)
        writer.add_context_length(context)
        writer.add_embedding_length(args.hidden_size)
        if falcon:  # one number each: every block holds attention and an MLP
            writer.add_feed_forward_length(widths[0])
            writer.add_head_count(args.num_heads)
            writer.add_head_count_kv(args.num_kv_heads)
            writer.add_key_length(args.head_dim)
            writer.add_value_length(args.head_dim)
            writer.add_rope_dimension_count(args.head_dim)
            writer.add_rope_freq_base(base)
        elif arch_name in ("nemotron_h", "granitehybrid"):
            writer.add_feed_forward_length(widths[0] if granite else widths)  # granitehybrid reads layer 0's
            writer.add_head_count(args.num_heads)  # one number: llama.cpp reads layer 0's as the model's
            writer.add_head_count_kv([args.num_kv_heads if a else 0 for a in attention])
            if args.num_heads:
                writer.add_key_length(args.head_dim)
                writer.add_value_length(args.head_dim)
            if arch_name == "nemotron_h":
                writer.add_layer_norm_eps(args.rms_norm_eps)  # nemotron_h requires it
        else:
            writer.add_feed_forward_length(0)
            writer.add_head_count(0)
        if granite:
            writer.add_rope_scaling_finetuned(rotated is not None)  # granitehybrid's switch for RoPE
            if rotated is not None:
                writer.add_rope_dimension_count(rotated)
                writer.add_rope_freq_base(base)
        writer.add_ssm_conv_kernel(ssm.conv_kernel)
        writer.add_ssm_inner_size(ssm.num_heads * P)
        writer.add_ssm_state_size(N)
        writer.add_ssm_time_step_rank(ssm.num_heads)
        writer.add_ssm_group_count(ssm.n_groups)
        writer.add_layer_norm_rms_eps(args.rms_norm_eps)

    # llama.cpp computes the convolution, A, D and the gated norm in float32
    data = [(name, *_array(t, np.float32 if any(part in name for part in (".ssm_conv1d.", ".ssm_a", ".ssm_d",
                                                                          ".ssm_norm.")) else dtype))
            for name, t in tensors.items()]
    return _save(output, arch, ckpt, rate, args.vocab_size, file_type, header, data)


def _save(output: Path, arch: gguf.MODEL_ARCH, ckpt: Checkpoint, rate: float, vocab_size: int,
          file_type: gguf.LlamaFileType, header, data: list) -> Path:
    """Write the GGUF file ``output`` (atomically): its name, the architecture's fields
    (``header(writer)``), vocabulary size, file type, tokenizer and the tensors ``data`` [(name,
    array, raw dtype)]."""
    try:
        with atomic_path(output) as tmp:
            writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
            writer.add_name(f"{ckpt.source.name or ckpt.path.stem} at rate {rate}")
            header(writer)
            writer.add_vocab_size(vocab_size)
            writer.add_file_type(file_type)
            if file_type == gguf.LlamaFileType.MOSTLY_Q4_0:
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_vocab(writer, ckpt, vocab_size)
            for name, array, raw_dtype in data:
                writer.add_tensor(name, array, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as err:
        raise ExportError(f"cannot write {output}: {err.strerror or err}") from None
    return output


def rope_factors(config: Mapping, head_dim: int, layer_type: str | None = None) -> tuple[float, torch.Tensor | None]:
    """RoPE base and llama.cpp's per-pair frequency divisors (``rope_freqs``, None when all are 1)
    that give transformers' frequencies for ``config`` (its ``layer_type`` blocks) exactly as the
    runtime computes them."""
    inv_freq, scaling = rotary_frequencies(config, layer_type)
    if scaling != 1:
        raise ExportError(f"RoPE parameters {config.get('rope_parameters')} scale attention by {scaling}; "
                          "GGUF export supports RoPE types that only change the frequencies (default, linear, llama3)")
    base = rope_parameters(config, layer_type).get("rope_theta") or config.get("rope_theta", 10000.0)
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (default / inv_freq.double()).float()
    return float(base), None if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0) else factors


def _check_swa(config: Mapping, windows: list[int | None], pattern: int, local_base: float) -> None:
    """Refuse sliding-window layers that llama.cpp's architecture would place or turn otherwise:
    it slides every layer but each ``pattern``-th, and turns those at a fixed RoPE base."""
    expected = [max(w for w in windows if w) if i % pattern < pattern - 1 else None for i in range(len(windows))]
    if windows != expected:
        raise ExportError(f"the model's sliding-window layers {[i for i, w in enumerate(windows) if w]} are not "
                          f"llama.cpp's (all but every {pattern}th), so llama.cpp cannot run it")
    local = rope_parameters(config, "sliding_attention")
    if local.get("rope_type", "default") != "default" or local.get("rope_theta") != local_base:
        raise ExportError(f"the sliding-window layers' RoPE {dict(local)} is not llama.cpp's (default, base "
                          f"{local_base:g}), so llama.cpp cannot run this model")


def write_gguf(checkpoint: str | Path, rate: float, output: str | Path, float_type: str = "f16") -> Path:
    """Write ``rate`` of the nested checkpoint ``checkpoint`` to the GGUF file ``output`` for
    llama.cpp (``llama`` architecture at uniform MLP width, ``deci`` otherwise; the family's own
    architecture where it has one, ``mamba2``, ``nemotron_h``, ``granitehybrid`` or ``falcon-h1`` for
    a model with Mamba2 blocks: ``_write_hybrid``) and return its path.

    4-bit matrices are copied as Q4_0 and 8-bit ones as Q8_0; float matrices are written as
    ``float_type`` (f16 or f32).
    """
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float type {float_type!r} is not accepted; accepted: {', '.join(FLOAT_TYPES)}")
    ckpt = Checkpoint(checkpoint)
    ckpt.rate_entry(rate)  # an error lists the offered rates
    output = _writable(Path(output))
    config = ckpt.config
    family = checkpoint_family(ckpt)
    weights = runtime_weights(ckpt.read_rate(rate), config)
    args = ModelArgs.from_weights(weights, config)
    if any(not (isinstance(layer, LayerArgs) and layer.attention and layer.mlp) for layer in args.layers):
        return _write_hybrid(ckpt, rate, output, float_type, weights, args, family)
    if abs(args.attention_scale * args.head_dim ** 0.5 - 1) > 1e-6:
        raise ExportError(f"this {family.name} model scales q.k by {args.attention_scale:.6g}; llama.cpp scales it by "
                          f"1/sqrt(head size) = {args.head_dim ** -0.5:.6g}, so it cannot run this model")
    windows = layer_windows(config)
    window = max((w for w in windows if w), default=None)
    global_type = "full_attention" if config.get("layer_types") else None
    base, factors = rope_factors(config, args.head_dim, global_type)
    linear = None  # an architecture with sliding layers scales its global layers' RoPE itself
    if window and family.gguf_swa:
        _check_swa(config, windows, *family.gguf_swa)
        rope = rope_parameters(config, global_type)
        if rope.get("rope_type") == "linear":
            linear, factors = float(rope["factor"]), None
    widths = [layer.intermediate_size for layer in args.layers]
    tensors = full_heads(weights, args, family.gguf_neox)
    uniform = len(set(widths)) == 1
    if not uniform and family.gguf[1] is None:  # no per-layer architecture: zero channels up to the widest
        tensors = widest_mlp(tensors, widths)
        widths, uniform = [max(widths)] * len(widths), True
    arch_name = family.gguf[0] if uniform else family.gguf[1]
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch_name]

    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # llama.cpp reads the tied head from token_embd
    dtype, file_type = FLOAT_TYPES[float_type]
    if any(isinstance(t, QuantizedTensor) for t in tensors.values()):
        file_type = gguf.LlamaFileType.MOSTLY_Q4_0
    data = []
    for name, t in tensors.items():
        data.append((gguf_name(name, arch), *_array(t, dtype)))
    if factors is not None:
        data.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy(), None))

    n = len(args.layers)
    context = config["max_position_embeddings"]
    def header(writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(n)
        if window and family.gguf_swa:
            writer.add_context_length(context)
            writer.add_sliding_window(window)
        else:  # llama.cpp's architecture has no sliding window: the file claims only the context
            writer.add_context_length(min(context, window or context))  # on which both agree
        writer.add_embedding_length(args.hidden_size)
        writer.add_feed_forward_length(widths[0] if uniform else widths)
        writer.add_head_count(args.num_heads if uniform else [args.num_heads] * n)
        writer.add_head_count_kv(args.num_kv_heads if uniform else [args.num_kv_heads] * n)
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_rope_freq_base(base)
        if linear:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(linear)
        writer.add_layer_norm_rms_eps(args.rms_norm_eps)

    return _save(output, arch, ckpt, rate, args.vocab_size, file_type, header, data)

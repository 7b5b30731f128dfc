"""Bamba checkpoints exported: GGUF for llama.cpp's ``granitehybrid`` (the architecture its converter
writes ``BambaForCausalLM`` as: per-layer block kinds kept; MLP widths, V/O rank and the Mamba2
blocks' P and N, q/k pairs widened with zeros; q/k interleaved, the turning pairs first), stock
Hugging Face ``BambaForCausalLM``, ONNX's refusal, and all three through ``elastiq export`` (tiny
random hybrid of test_bamba: Mamba2 + MLP, attention + MLP, Mamba2 + MLP; float and 4-bit)."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from test_bamba import HIDDEN, bamba_checkpoint, bamba_folder, bamba_q4  # noqa: F401
from test_export_gguf import _q8_0

from elastiq.cli import main
from elastiq.exporters.gguf import write_gguf
from elastiq.exporters.hf import _ssm_head_dim, write_hf
from elastiq.exporters.onnx import OnnxExportError, write_onnx
from elastiq.exporters.padding import ssm_widest
from elastiq.families import family_for
from elastiq.modeling.model import LayerArgs, ModelArgs, SSMLayerArgs, Transformer, runtime_weights

FULL_P = 2 * HIDDEN // 4  # granitehybrid's only inner size, 2 x hidden, over the fixture's 4 SSM heads


def _args(ckpt, rate: float) -> ModelArgs:
    return ModelArgs.from_weights(runtime_weights(ckpt.read_rate(rate), ckpt.config), ckpt.config)


def reference(ckpt, rate: float, head_dim: int | None = None, config: dict | None = None) -> Transformer:
    """The runtime's model at ``rate`` (of ``config``, the checkpoint's by default) with its Mamba2
    blocks widened as an export widens them (to ``head_dim`` channels per head, or the widest): the
    same as the runtime's where no block is widened in P, and up to the gated norm's epsilon elsewhere."""
    config = config or ckpt.config
    weights = runtime_weights(ckpt.read_rate(rate), config)
    weights, _, _ = ssm_widest(weights, ModelArgs.from_weights(weights, config), head_dim)
    family = family_for(config)
    return Transformer.from_weights({family.checkpoint_name(k): v for k, v in weights.items()}, config)


@torch.no_grad()
def test_the_file_keeps_each_blocks_kind_and_widens_the_rest(bamba_checkpoint, ids, tmp_path):
    """granitehybrid reads each block's kind from the per-layer head_count_kv; it sizes every MLP by
    one feed_forward_length (layer 0's) and loads Mamba2 blocks of inner size 2 x hidden only, so
    the file holds the widest MLP and the unpruned P (zeros), the widest N, whole heads (pruned
    pairs zeros); partial RoPE turns 16 of the 32 channels of a head. Widening a block's P is exact up to the gated norm's epsilon:
    with a negligible one, the widened model is the runtime's."""
    ckpt = bamba_checkpoint
    reader = gguf.GGUFReader(write_gguf(ckpt.path, 0.35, tmp_path / "b.gguf", float_type="f32"))
    field = lambda key: reader.fields[f"granitehybrid.{key}"].contents()  # noqa: E731
    assert reader.fields["general.architecture"].contents() == "granitehybrid"
    args = _args(ckpt, 0.35)
    mlp = [layer.intermediate_size for layer in args.layers]
    mixers = [layer for layer in args.layers if isinstance(layer, SSMLayerArgs)]
    assert len(set(mlp)) > 1 and field("feed_forward_length") == max(mlp)
    assert args.layers[1].rope_pairs < 16  # pairs pruned, turning and passing ones alike: widened with zeros
    assert field("attention.head_count_kv") == [0, 2, 0] and field("attention.head_count") == 4
    assert field("rope.dimension_count") == 16 and field("attention.key_length") == 32
    assert {m.head_dim for m in mixers} == {FULL_P, FULL_P // 2}  # layer 2's P is widened
    assert field("ssm.inner_size") == 2 * HIDDEN and field("ssm.state_size") == max(m.state_size for m in mixers)
    tensors = {t.name: tuple(t.shape) for t in reader.tensors}  # GGUF lists ne: [in, out]
    assert tensors["blk.0.ffn_gate.weight"] == tensors["blk.2.ffn_up.weight"] == (HIDDEN, max(mlp))
    assert tensors["blk.1.attn_v.weight"] == (HIDDEN, 2 * 32) and "blk.0.ffn_norm.weight" in tensors
    config = {**ckpt.config, "rms_norm_eps": 1e-9}  # the widened block's norm differs by its epsilon alone
    plain = Transformer.from_weights(ckpt.read_rate(0.35), config)(ids)
    assert (reference(ckpt, 0.35, FULL_P, config)(ids) - plain).abs().max() <= 1e-3 * plain.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("which", ["float", "q4"])
def test_llama_cpp_matches_the_runtime(which, bamba_checkpoint, bamba_q4, ids, tmp_path):
    """llama.cpp's granitehybrid gives the runtime's logits, over the whole sequence and decoding
    token by token through its KV cache and recurrent states, at rate 0 (nothing widened: the
    runtime's model itself) and 0.35 (a block's P widened: the widened model's, ``reference``). F32
    file of the float checkpoint: 1e-4 of the largest logit (measured 1e-6).

    The 4-bit file holds the checkpoint's Q4_0 and Q8_0 codes, and llama.cpp rounds such a
    matmul's input to Q8_0: against the runtime, that costs up to 4% of the largest logit. With the
    runtime's matmul inputs rounded alike, most positions agree to 1e-4 (measured at rate 0: 42 of
    the 50 of both passes, 1e-6); a position where one input sits on a rounding boundary, so that
    float summation order flips its code, may not, nor may the few that follow it through the
    recurrent state (measured: positions 20-23, up to 0.9%)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = bamba_checkpoint if which == "float" else bamba_q4
    tokens = ids[0, :40].tolist()
    for rate in (0.0, 0.35):
        path = write_gguf(ckpt.path, rate, tmp_path / f"{rate}.gguf", float_type="f32")
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                              type_k=0, type_v=0, flash_attn=False)
        llm.eval(tokens)
        whole = torch.from_numpy(np.asarray(llm.scores[:len(tokens)]))
        llm.reset()  # prefill, then one token at a time
        llm.eval(tokens[:20])
        steps = []
        for token in tokens[20:30]:
            llm.eval([token])
            steps.append(np.asarray(llm.scores[llm.n_tokens - 1]))
        del llm
        model = reference(ckpt, rate, FULL_P)
        want = model(torch.tensor([tokens]))[0]
        if rate == 0.0:  # nothing widened: the runtime's own model
            plain = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
            assert torch.equal(want, plain(torch.tensor([tokens]))[0])
        scale = want.abs().max()
        rounded = None
        if which == "q4":  # the runtime with every matmul input rounded to Q8_0, as llama.cpp rounds it
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(lambda _, args: (_q8_0(args[0]),))
            rounded = model(torch.tensor([tokens]))[0]
        close = []
        for got, span in ((whole, slice(0, 40)), (torch.from_numpy(np.stack(steps)), slice(20, 30))):
            error = (got - want[span]).abs().amax(-1)
            assert error.max() <= (1e-4 if rounded is None else 4e-2) * scale, (which, rate, error.max() / scale)
            if rounded is not None:
                close.append((got - rounded[span]).abs().amax(-1) <= 1e-4 * scale)
        if rounded is not None:  # over the 50 positions of both passes
            assert torch.cat(close).float().mean() >= 0.75, (rate, close)


@torch.no_grad()
def test_stock_transformers_loads_every_rate(bamba_checkpoint, ids, tmp_path):
    """Stock BambaForCausalLM holds one MLP width, one SSM head size and state size: the rate's
    widest, zero-padded (its inner size mamba_expand x hidden stays whole); V/O rank at the full
    head size; the split mixers fused back into in_proj and conv1d, every tensor loaded."""
    from transformers import BambaForCausalLM

    ckpt = bamba_checkpoint
    for rate in (0.0, 0.35):
        model, info = BambaForCausalLM.from_pretrained(write_hf(ckpt.path, rate, tmp_path / str(rate)),
                                                       output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        args = _args(ckpt, rate)
        mixers = [layer for layer in args.layers if isinstance(layer, SSMLayerArgs)]
        assert model.config.intermediate_size == max(layer.intermediate_size for layer in args.layers)
        assert model.config.mamba_d_head == max(m.head_dim for m in mixers) == FULL_P
        assert model.config.mamba_d_state == max(m.state_size for m in mixers)
        assert model.config.mamba_expand * HIDDEN == 4 * FULL_P
        assert all(layer.v_rank == 32 for layer in args.layers if isinstance(layer, LayerArgs))
        want = reference(ckpt, rate)(ids)
        got = model.eval()(ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), rate


def test_the_stock_head_size_keeps_a_whole_expand(bamba_checkpoint):
    """transformers' Bamba (and Mamba2) derive the inner size from an integer multiple of the
    hidden size: the widest P is raised to the next one whose 4 heads fill a whole multiple."""
    args = _args(bamba_checkpoint, 0.35)
    assert _ssm_head_dim("bamba", args) == FULL_P
    assert _ssm_head_dim("bamba", replace(args, hidden_size=192)) == 96  # 4 x 96 = 2 x 192
    assert _ssm_head_dim("nemotron_h", replace(args, hidden_size=192)) == FULL_P  # no expand field


def test_onnx_is_refused_naming_what_works(bamba_checkpoint, tmp_path):
    with pytest.raises(OnnxExportError, match=r"a bamba model has Mamba2 blocks \(a recurrent scan\), which it does "
                                              r"not build yet: export it to GGUF \(--format gguf: llama.cpp's "
                                              r"granitehybrid\) or to Hugging Face \(--format hf\)"):
        write_onnx(bamba_checkpoint.path, 0.0, tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("fmt,name", [("gguf", "b.gguf"), ("hf", "b-hf")])
def test_the_command_line_exports_each_format(fmt, name, bamba_q4, tmp_path, capsys):
    out = tmp_path / name
    assert main(["export", str(bamba_q4.path), "--rate", "0.35", "--format", fmt, "-o", str(out)]) == 0
    assert out.exists() and f"({fmt}, rate 0.35, " in capsys.readouterr().err
    if fmt == "gguf":
        reader = gguf.GGUFReader(out)
        assert reader.fields["general.architecture"].contents() == "granitehybrid"
        assert {t.tensor_type for t in reader.tensors} >= {gguf.GGMLQuantizationType.Q4_0}
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert main(["export", str(bamba_q4.path), "--rate", "0.35", "--format", "onnx", "-o",
                 str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elastiq: error: the ONNX export") and "Traceback" not in err

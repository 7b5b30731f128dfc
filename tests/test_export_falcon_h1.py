"""Falcon-H1 checkpoints exported: GGUF for llama.cpp's ``falcon-h1`` (every block attention and a
Mamba2 mixer side by side, then a SwiGLU MLP: one MLP width, head size and SSM inner and state size,
so pruned units come back as zeros; q/k in rotate-half pairs), stock Hugging Face
``FalconH1ForCausalLM`` (multipliers of 1, as the checkpoint's config says), ONNX's refusal, and
all three through ``elastiq export`` (tiny random model of test_falcon_h1, its mixers gated without
a norm; float and 4-bit)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import compressed
from test_export_bamba import reference
from test_export_gguf import _q8_0
from test_falcon_h1 import HIDDEN, build_falcon_h1, falcon_checkpoint, falcon_folder, falcon_q4  # noqa: F401

from elastiq.cli import main
from elastiq.exporters.gguf import write_gguf
from elastiq.exporters.hf import write_hf
from elastiq.exporters.onnx import OnnxExportError, write_onnx
from elastiq.modeling.model import ModelArgs, SSMLayerArgs, Transformer, runtime_weights


def _args(ckpt, rate: float) -> ModelArgs:
    return ModelArgs.from_weights(runtime_weights(ckpt.read_rate(rate), ckpt.config), ckpt.config)


def runtime(ckpt, rate: float) -> Transformer:
    return Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)


@torch.no_grad()
def test_the_file_widens_every_branch_to_the_widest(falcon_checkpoint, tmp_path):
    """falcon-h1 has one MLP width, one head count and size, one SSM inner and state size: every
    MLP at the rate's widest, every head at full size, every mixer at the widest P and N (zeros);
    no ssm_norm where the mixers are gated without one, and no multiplier (folded, as llama.cpp's
    converter folds them)."""
    ckpt = falcon_checkpoint
    reader = gguf.GGUFReader(write_gguf(ckpt.path, 0.35, tmp_path / "f.gguf", float_type="f32"))
    field = lambda key: reader.fields[f"falcon-h1.{key}"].contents()  # noqa: E731
    assert reader.fields["general.architecture"].contents() == "falcon-h1"
    args = _args(ckpt, 0.35)
    mlp = [layer.intermediate_size for layer in args.layers]
    P, N = max(m.head_dim for m in args.layers), max(m.state_size for m in args.layers)
    assert all(isinstance(layer, SSMLayerArgs) and layer.attention for layer in args.layers)
    assert len(set(mlp)) > 1 and field("feed_forward_length") == max(mlp)
    assert len({m.head_dim for m in args.layers}) > 1  # some block's P is widened
    assert field("attention.head_count") == 2 and field("attention.head_count_kv") == 1  # beside 4 SSM heads
    assert field("attention.key_length") == field("rope.dimension_count") == 32
    assert field("ssm.inner_size") == 4 * P and field("ssm.state_size") == N and field("ssm.group_count") == 2
    assert not [key for key in reader.fields if "multiplier" in key]
    tensors = {t.name: tuple(t.shape) for t in reader.tensors}  # GGUF lists ne: [in, out]
    assert tensors["blk.0.ffn_gate.weight"] == tensors["blk.2.ffn_up.weight"] == (HIDDEN, max(mlp))
    assert tensors["blk.1.attn_q.weight"] == (HIDDEN, 2 * 32) and tensors["blk.1.attn_v.weight"] == (HIDDEN, 1 * 32)
    assert tensors["blk.0.ssm_out.weight"] == (4 * P, HIDDEN) and not [n for n in tensors if "ssm_norm" in n]
    assert "blk.0.ffn_norm" in tensors  # llama.cpp's falcon-h1 names it without .weight


@torch.no_grad()
@pytest.mark.parametrize("which", ["float", "q4"])
def test_llama_cpp_matches_the_runtime(which, falcon_checkpoint, falcon_q4, ids, tmp_path):
    """llama.cpp's falcon-h1 gives the runtime's logits, over the whole sequence and decoding token
    by token through its KV cache and recurrent states, at rate 0 and 0.35 (P, N, MLP and V/O
    widened with zeros, q/k pairs back at their rotate-half places: exact, the mixers having no
    gated norm). F32 file of the float checkpoint: 1e-4 of the largest logit.

    The 4-bit file holds the checkpoint's Q4_0 and Q8_0 codes, and llama.cpp rounds such a
    matmul's input to Q8_0: against the runtime, that costs up to 4% of the largest logit (measured
    1.9%). Against the runtime with its matmul inputs rounded alike, positions agree to 1e-4
    (measured 3e-7) until one whose input sits on a rounding boundary, where float summation order
    flips a code; every block's KV cache and recurrent state carry that flip to all the positions
    after it (measured at rate 0.35: position 3 alone at 0.16%, then from position 28 on about 1%,
    so 35 of the 50 positions of both passes agree; at rate 0, all 50)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = falcon_checkpoint if which == "float" else falcon_q4
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
        model = runtime(ckpt, rate)
        want = model(torch.tensor([tokens]))[0]
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
                apart = (got - rounded[span]).abs().amax(-1)
                assert apart.max() <= 2e-2 * scale, (rate, apart.max() / scale)
                close.append(apart <= 1e-4 * scale)
        if rounded is not None:  # over the 50 positions of both passes
            assert torch.cat(close).float().mean() >= 0.6, (rate, close)


@torch.no_grad()
def test_stock_transformers_loads_every_rate(falcon_checkpoint, ids, tmp_path):
    """Stock FalconH1ForCausalLM holds one MLP width, one SSM head size and state size: the rate's
    widest, zero-padded (mamba_d_ssm = heads x P); q/k pairs back in rotate-half order and V/O rank
    at the full head size; multipliers of 1; the split mixers fused back, every tensor loaded. The
    mixers have no gated norm, so widening them is exact: the runtime's logits to 1e-4."""
    from transformers import FalconH1ForCausalLM

    ckpt = falcon_checkpoint
    for rate in (0.0, 0.15, 0.35):
        model, info = FalconH1ForCausalLM.from_pretrained(write_hf(ckpt.path, rate, tmp_path / str(rate)),
                                                          output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        args, config = _args(ckpt, rate), model.config
        assert config.intermediate_size == max(layer.intermediate_size for layer in args.layers)
        assert config.mamba_d_head == max(layer.head_dim for layer in args.layers)
        assert config.mamba_d_ssm == 4 * config.mamba_d_head
        assert config.mamba_d_state == max(layer.state_size for layer in args.layers)
        assert (config.embedding_multiplier, config.key_multiplier, config.ssm_multipliers) == (1.0, 1.0, [1.0] * 5)
        want = runtime(ckpt, rate)(ids)
        got = model.eval()(ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), rate


@pytest.fixture(scope="module")
def gated_checkpoint(tokenizer, data_dir, tmp_path_factory):
    """The fixture's model with its mixers gated and normalised (``mamba_rms_norm``), compressed."""
    folder = tmp_path_factory.mktemp("falcon_h1_gated")
    build_falcon_h1(len(tokenizer), mamba_rms_norm=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return compressed(folder, data_dir, tmp_path_factory.mktemp("falcon-gated") / "g.elastiq")


@torch.no_grad()
def test_a_gated_norm_is_widened_up_to_its_epsilon(gated_checkpoint, ids, tmp_path):
    """With a gated norm, a mixer widened in P has its norm weight scaled so that the mean over its
    channels, zeros included, is restored up to the norm's epsilon (``ssm_widest``): llama.cpp's
    falcon-h1 (its ssm_norm per group) and stock transformers compute that widened model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, rate = gated_checkpoint, 0.35
    assert len({layer.head_dim for layer in _args(ckpt, rate).layers}) > 1  # some block's P is widened
    ids = ids[:, :40]
    want = reference(ckpt, rate)(ids)[0]
    scale = want.abs().max()
    path = write_gguf(ckpt.path, rate, tmp_path / "g.gguf", float_type="f32")
    assert "blk.0.ssm_norm.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False)
    llm.eval(ids[0].tolist())
    got = torch.from_numpy(np.asarray(llm.scores[:40]))
    del llm
    assert (got - want).abs().max() <= 1e-4 * scale
    from transformers import FalconH1ForCausalLM

    model = FalconH1ForCausalLM.from_pretrained(write_hf(ckpt.path, rate, tmp_path / "g-hf")).eval()
    assert (model(ids).logits[0] - want).abs().max() <= 1e-4 * scale


def test_onnx_is_refused_naming_what_works(falcon_checkpoint, tmp_path):
    with pytest.raises(OnnxExportError, match=r"a falcon_h1 model has Mamba2 blocks \(a recurrent scan\), which it "
                                              r"does not build yet: export it to GGUF \(--format gguf: llama.cpp's "
                                              r"falcon-h1\) or to Hugging Face \(--format hf\)"):
        write_onnx(falcon_checkpoint.path, 0.0, tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize("fmt,name", [("gguf", "f.gguf"), ("hf", "f-hf")])
def test_the_command_line_exports_each_format(fmt, name, falcon_q4, tmp_path, capsys):
    out = tmp_path / name
    assert main(["export", str(falcon_q4.path), "--rate", "0.35", "--format", fmt, "-o", str(out)]) == 0
    assert out.exists() and f"({fmt}, rate 0.35, " in capsys.readouterr().err
    if fmt == "gguf":
        reader = gguf.GGUFReader(out)
        assert reader.fields["general.architecture"].contents() == "falcon-h1"
        assert {t.tensor_type for t in reader.tensors} >= {gguf.GGMLQuantizationType.Q4_0}
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()

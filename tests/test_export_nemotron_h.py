"""Nemotron-H checkpoints exported: GGUF for llama.cpp's ``nemotron_h`` (per-layer MLP widths kept;
V/O rank and the Mamba2 blocks' P and N widened with zeros), stock Hugging Face
``NemotronHForCausalLM``, ONNX's refusal, and all three through ``elastiq export`` (tiny random
hybrid of test_nemotron_h: Mamba2, MLP, attention, MLP, Mamba2; float and 4-bit)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_export_gguf import _q8_0
from test_nemotron_h import hybrid_checkpoint, hybrid_folder, hybrid_q4  # noqa: F401

from elastiq.cli import main
from elastiq.exporters.gguf import write_gguf
from elastiq.exporters.hf import write_hf
from elastiq.exporters.onnx import OnnxExportError, write_onnx
from elastiq.exporters.padding import ssm_widest
from elastiq.families import family_for
from elastiq.modeling.model import LayerArgs, ModelArgs, SSMLayerArgs, Transformer, runtime_weights

def _args(ckpt, rate: float) -> ModelArgs:
    return ModelArgs.from_weights(runtime_weights(ckpt.read_rate(rate), ckpt.config), ckpt.config)


def reference(ckpt, rate: float, config: dict | None = None) -> Transformer:
    """The runtime's model at ``rate`` (of ``config``, the checkpoint's by default), with its Mamba2
    blocks widened as the exports widen them where they keep different channels per head (then the
    exports equal it, and the runtime up to the gated norm's epsilon)."""
    config = config or ckpt.config
    weights = runtime_weights(ckpt.read_rate(rate), config)
    args = ModelArgs.from_weights(weights, config)
    if len({layer.head_dim for layer in args.layers if isinstance(layer, SSMLayerArgs)}) > 1:
        weights, _, _ = ssm_widest(weights, args)
    family = family_for(config)
    return Transformer.from_weights({family.checkpoint_name(k): v for k, v in weights.items()}, config)


def test_the_file_keeps_each_blocks_kind_and_mlp_width(hybrid_checkpoint, tmp_path):
    """llama.cpp's nemotron_h reads each block's kind from two per-layer arrays and keeps every
    MLP's own width; V/O rank, P and N are one number each, so the file holds the widest."""
    ckpt = hybrid_checkpoint
    reader = gguf.GGUFReader(write_gguf(ckpt.path, 0.35, tmp_path / "h.gguf", float_type="f32"))
    field = lambda key: reader.fields[f"nemotron_h.{key}"].contents()  # noqa: E731
    assert reader.fields["general.architecture"].contents() == "nemotron_h"
    args = _args(ckpt, 0.35)
    mlp = [layer.intermediate_size if isinstance(layer, LayerArgs) and layer.mlp else 0 for layer in args.layers]
    assert mlp[1] != mlp[3] and field("feed_forward_length") == mlp  # per-layer widths, no padding
    assert field("attention.head_count_kv") == [0, 0, 2, 0, 0] and field("attention.head_count") == 4
    mixers = [layer for layer in args.layers if isinstance(layer, SSMLayerArgs)]
    assert field("ssm.inner_size") == 4 * max(m.head_dim for m in mixers)
    assert field("ssm.state_size") == max(m.state_size for m in mixers)
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.1.ffn_up.weight" in tensors and "blk.1.ffn_gate.weight" not in tensors
    assert tuple(tensors["blk.1.ffn_up.weight"].shape) == (128, mlp[1])  # GGUF lists ne: [in, out]
    assert tuple(tensors["blk.2.attn_v.weight"].shape) == (128, 2 * 64)  # V back at full head size


@torch.no_grad()
@pytest.mark.parametrize("which", ["float", "q4"])
def test_llama_cpp_matches_the_runtime(which, hybrid_checkpoint, hybrid_q4, ids, tmp_path):
    """llama.cpp's nemotron_h gives the runtime's logits, over the whole sequence and decoding token
    by token through its KV cache and recurrent states, at rates of one P (0, 0.35) and of widened
    ones (0.15: the widened model's, ``reference``). F32 file of the float checkpoint: 1e-4 of the
    largest logit (measured 1e-6).

    The 4-bit file holds the checkpoint's Q4_0 and Q8_0 codes, and llama.cpp rounds such a
    matmul's input to Q8_0: against the runtime, that costs up to 4% of the largest logit (measured
    1.8-2.2%). With the runtime's matmul inputs rounded alike, most positions agree to 1e-4
    (measured 1e-6); a position where one input sits on a rounding boundary, so that float
    summation order flips its code, may not (measured: 2 of 40 positions, 0.5%).

    llama.cpp does not clamp dt below at time_step_min as the runtime does; these random mixers'
    steps (0.05-1) never come near that floor, which the test checks, so the two agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = hybrid_checkpoint if which == "float" else hybrid_q4
    tokens = ids[0, :40].tolist()
    for rate in (0.0, 0.15, 0.35):
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
        model = reference(ckpt, rate)
        want = model(torch.tensor([tokens]))[0]
        unfloored = reference(ckpt, rate, {**ckpt.config, "time_step_min": 0.0})(torch.tensor([tokens]))[0]
        assert torch.equal(want, unfloored), rate  # the floor is never reached here
        scale = want.abs().max()
        rounded = None
        if which == "q4":  # the runtime with every matmul input rounded to Q8_0, as llama.cpp rounds it
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(lambda _, args: (_q8_0(args[0]),))
            rounded = model(torch.tensor([tokens]))[0]
        for got, span in ((whole, slice(0, 40)), (torch.from_numpy(np.stack(steps)), slice(20, 30))):
            error = (got - want[span]).abs().amax(-1)
            assert error.max() <= (1e-4 if rounded is None else 4e-2) * scale, (which, rate, error.max() / scale)
            if rounded is not None:
                close = (got - rounded[span]).abs().amax(-1) <= 1e-4 * scale
                assert close.float().mean() >= 0.75, (rate, close)


@torch.no_grad()
def test_stock_transformers_loads_every_rate(hybrid_checkpoint, ids, tmp_path):
    """Stock NemotronHForCausalLM holds one MLP width, one SSM head size and state size: the rate's
    widest, zero-padded; attention's V/O rank at the full head size."""
    from transformers import NemotronHForCausalLM

    ckpt = hybrid_checkpoint
    for rate in (0.0, 0.15, 0.35):  # 0.15 widens a Mamba2 block's channels per head
        model = NemotronHForCausalLM.from_pretrained(write_hf(ckpt.path, rate, tmp_path / str(rate))).eval()
        args = _args(ckpt, rate)
        mixers = [layer for layer in args.layers if isinstance(layer, SSMLayerArgs)]
        assert model.config.intermediate_size == max(layer.intermediate_size for layer in args.layers
                                                     if isinstance(layer, LayerArgs) and layer.mlp)
        assert model.config.mamba_head_dim == max(m.head_dim for m in mixers)
        assert model.config.ssm_state_size == max(m.state_size for m in mixers)
        want = reference(ckpt, rate)(ids)
        got = model(ids).logits
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), rate


def test_onnx_is_refused_naming_what_works(hybrid_checkpoint, tmp_path):
    with pytest.raises(OnnxExportError, match=r"a nemotron_h model has Mamba2 blocks.*attention blocks without RoPE.*"
                                              r"ungated MLP blocks.*GGUF \(--format gguf: llama.cpp's nemotron_h\) or "
                                              r"to Hugging Face \(--format hf\)"):
        write_onnx(hybrid_checkpoint.path, 0.0, tmp_path / "h.onnx")
    assert not (tmp_path / "h.onnx").exists()


@pytest.mark.parametrize("fmt,name", [("gguf", "h.gguf"), ("hf", "h-hf")])
def test_the_command_line_exports_each_format(fmt, name, hybrid_q4, tmp_path, capsys):
    out = tmp_path / name
    assert main(["export", str(hybrid_q4.path), "--rate", "0.35", "--format", fmt, "-o", str(out)]) == 0
    assert out.exists() and f"({fmt}, rate 0.35, " in capsys.readouterr().err
    if fmt == "gguf":
        reader = gguf.GGUFReader(out)
        assert {t.tensor_type for t in reader.tensors} >= {gguf.GGMLQuantizationType.Q4_0}
    assert main(["export", str(hybrid_q4.path), "--rate", "0.35", "--format", "onnx", "-o",
                 str(tmp_path / "h.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elastiq: error: the ONNX export") and "Traceback" not in err

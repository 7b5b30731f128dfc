"""Nemotron-H (a hybrid of Mamba2 mixers, attention alone and ReLU² MLPs alone) in the runtime's
memory planner and backend choice, and in nested LoRA recovery (tiny random models, built offline:
the fixtures of ``test_nemotron_h``)."""

from __future__ import annotations

import pytest
import torch

from hybrid_checks import llama_cpp_plans, masks_compute_every_slice
from test_nemotron_h import hybrid_checkpoint, hybrid_folder, hybrid_q4  # noqa: F401

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.families.nemotron_h import NEMOTRON_H

CTX = 64


def expected_cache_bytes(ckpt: Checkpoint, rate: float, ctx: int, itemsize: int) -> tuple[int, int]:
    """(KV cache bytes, recurrent state bytes) of ``rate``, from the config and the rate's widths
    alone: each attention block keeps its kept q/k pairs (two key channels each) and its kept V
    rank per KV head for ``ctx`` positions in the activations' dtype; each Mamba2 block holds its
    convolution inputs (K steps of x, B and C) and its H x P x N state in float32; an MLP holds
    nothing."""
    config, widths = ckpt.config, ckpt.rate_entry(rate)["widths"]
    kv_heads = config["num_key_value_heads"]
    H, G, K = config["mamba_num_heads"], config["n_groups"], config["conv_kernel"]
    kv = states = 0
    for i, kind in enumerate(config["layers_block_type"]):
        if kind == "full_attention":
            kv += ctx * kv_heads * (2 * widths[f"layers.{i}.qk"] + widths[f"layers.{i}.vo"]) * itemsize
        elif kind == "linear_attention":
            P, N = widths[f"layers.{i}.ssm_p"], widths[f"layers.{i}.ssm_n"]
            states += 4 * ((H * P + 2 * G * N) * K + H * P * N)
    return kv, states


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_planner_counts_kv_for_attention_blocks_and_states_for_mixers(which, hybrid_checkpoint, hybrid_q4):
    """The torch footprint's cache is the attention blocks' KV plus the mixers' states (the MLP-only
    blocks add none), as computed apart from the planner and as the engine holds it; its weights are
    the engine's bytes."""
    from elastiq.modeling.ssm import SSMState
    from elastiq.runtime.engine import Engine
    from elastiq.runtime.memory import layer_widths, predict_footprint, runtime_shapes, widest_mlp

    ckpt = hybrid_checkpoint if which == "float" else hybrid_q4
    per_rate = []
    for rate in ckpt.rates:
        engine = Engine(ckpt, rate, ctx=CTX)
        itemsize = engine.dtype.itemsize
        f = predict_footprint(ckpt, rate, CTX, engine.dtype, engine.int4, baseline=0)
        kv, states = expected_cache_bytes(ckpt, rate, CTX, itemsize)
        assert f.kv_cache == kv + states, (rate, f.kv_cache, kv, states)
        held_kv = sum(layer.kv_cache.k.nbytes + layer.kv_cache.v.nbytes for layer in engine.model.layers
                      if getattr(layer, "kv_cache", None) is not None)
        held_states = sum(m.conv.nbytes + m.ssm.nbytes for m in engine.model.modules() if isinstance(m, SSMState))
        assert (held_kv, held_states) == (kv, states), rate
        assert f.weights == engine.weight_bytes(), rate
        assert f.workspace > 0 and f.total == f.weights + f.kv_cache + f.workspace
        # the KV cache grows with the context, the states do not
        longer = predict_footprint(ckpt, rate, 2 * CTX, engine.dtype, engine.int4, baseline=0)
        assert longer.kv_cache - f.kv_cache == kv
        shapes = runtime_shapes(ckpt, rate)
        widths = ckpt.rate_entry(rate)["widths"]
        assert widest_mlp(shapes, ckpt.heads, NEMOTRON_H.ssm_config(ckpt.config)) == \
            max(w for name, w in widths.items() if name.endswith(".mlp"))
        kinds = [type(layer).__name__ for layer in layer_widths(shapes, ckpt.heads, NEMOTRON_H.ssm_config(ckpt.config))]
        assert kinds == ["SSMLayerArgs", "LayerArgs", "LayerArgs", "LayerArgs", "SSMLayerArgs"]
        per_rate.append(f)
    assert per_rate[0].kv_cache > per_rate[-1].kv_cache and per_rate[0].weights > per_rate[-1].weights


def test_onnxruntime_refuses_a_hybrid_naming_what_runs_it(hybrid_q4):
    """onnxruntime refuses the hybrid before planning or exporting anything, saying what its blocks
    are and that torch and llama.cpp run it."""
    from elastiq.runtime.backends import backend
    from elastiq.runtime.backends.exported import export_path
    from elastiq.runtime.backends.llamacpp import LlamaCppEngine
    from elastiq.runtime.backends.onnxrt import OnnxEngine

    assert LlamaCppEngine.refusal(hybrid_q4) is None  # llama.cpp's nemotron_h
    why = OnnxEngine.refusal(hybrid_q4)
    assert why == ("the onnxruntime backend runs models of attention + MLP blocks only, the only ones the ONNX export "
                   f"builds; {hybrid_q4.path.name} is a nemotron_h model of Mamba2, attention-only and MLP-only blocks: "
                   "run it with --backend torch or llama.cpp")
    with pytest.raises(ElastiqError) as refused:
        backend("onnxruntime").footprint(hybrid_q4, 0.0, CTX, 0)
    assert str(refused.value) == why
    assert not export_path(hybrid_q4, 0.0, "onnx").exists()  # nothing was exported


def test_llama_cpp_plans_what_its_nemotron_h_holds(hybrid_q4, tmp_path):
    """llama.cpp's nemotron_h holds a KV cache (f16, full head size, the context rounded up to 256
    cells) for the attention blocks alone and one sequence's float32 state for each mixer, at the
    rate's widest P and N: the footprint says so before and after the export (its weights within 2%
    of the file it will write), and llama.cpp's own account of its memory agrees; the engine goes on
    from its state only (a hybrid's mixers cannot go back)."""
    import shutil

    pytest.importorskip("llama_cpp")
    from elastiq.runtime.backends.llamacpp import LLAMA_CTX_PAD

    ckpt = Checkpoint(shutil.copytree(hybrid_q4.path, tmp_path / "h.elastiq"))
    config, rate, ctx = ckpt.config, ckpt.rates[-1], 100
    widths = ckpt.rate_entry(rate)["widths"]
    mixers = [i for i, kind in enumerate(config["layers_block_type"]) if kind == "linear_attention"]
    attention = config["layers_block_type"].count("full_attention")
    P = max(widths[f"layers.{i}.ssm_p"] for i in mixers)
    N = max(widths[f"layers.{i}.ssm_n"] for i in mixers)
    H, G, K = config["mamba_num_heads"], config["n_groups"], config["conv_kernel"]
    kv = LLAMA_CTX_PAD * attention * 2 * config["num_key_value_heads"] * config["head_dim"] * 2
    states = len(mixers) * 4 * ((K - 1) * (H * P + 2 * G * N) + H * P * N)
    llama_cpp_plans(ckpt, rate, ctx, kv, states, tmp_path)


def test_backend_auto_runs_a_hybrid_on_a_backend_that_can(hybrid_q4, capsys):
    from elastiq.cli import main
    from elastiq.runtime.fastest import choose_backend

    ckpt = hybrid_q4
    choice = choose_backend(ckpt, None, CTX, torch.bfloat16, True, 1, max_kl=float("inf"), tokenizer=ckpt.tokenizer())
    assert choice.backend in ("torch", "llama.cpp") and choice.plan.rate == 0.0
    assert "onnxruntime cannot run (the onnxruntime backend" in choice.reason
    assert main(["run", str(ckpt.path), "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", str(CTX),
                 "--max-kl", "inf", "--backend", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"--backend auto chose {choice.backend}:" in err and "loaded rate 0.0" in err


# --- nested LoRA recovery ---------------------------------------------------------------------------


def test_recovery_masks_compute_every_slice_of_a_hybrid(hybrid_checkpoint, ids):
    """With LoRA in every projection (the mixers' six, attention's four, the ungated MLPs' up and
    down), the masked full model computes each rate's slice of the merged weights: the MLP mask on
    the down projection's input needs no gate, the V/O mask on the value projection's output holds
    for attention alone."""
    mixer = ["ssm_in_b", "ssm_in_c", "ssm_in_dt", "ssm_in_x", "ssm_in_z", "ssm_out"]
    wrapped = masks_compute_every_slice(hybrid_checkpoint, NEMOTRON_H, ids)
    assert sorted(wrapped) == [*(f"layers.0.{s}" for s in mixer), "layers.1.ffn_down", "layers.1.ffn_up",
                               *(f"layers.2.{s}" for s in ("attn_k", "attn_output", "attn_q", "attn_v")),
                               "layers.3.ffn_down", "layers.3.ffn_up", *(f"layers.4.{s}" for s in mixer)]
    widths = hybrid_checkpoint.rate_entry(hybrid_checkpoint.rates[-1])["widths"]
    assert widths["layers.2.vo"] < 64 and widths["layers.3.mlp"] < 512  # the last rate cuts both


def test_nested_recovery_of_a_hybrid_lowers_the_loss_at_every_rate(hybrid_checkpoint, data_dir, tmp_path):
    import torch.nn.functional as F

    from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
    from elastiq.compressor.recover import RecoverError, RecoverOptions, recover_checkpoint
    from elastiq.modeling.model import Transformer

    options = RecoverOptions(steps=8, lr=1e-2, rank=4, alpha=8.0, batch=4, seqlen=32, samples=16, heldout=2,
                             lm_weight=1.0, bf16=False)
    out = Checkpoint(recover_checkpoint(hybrid_checkpoint.path, tmp_path / "r.elastiq", options, data=data_dir,
                                        progress=False))
    assert [(r["rate"], r["widths"]) for r in out.rate_table] == \
        [(r["rate"], r["widths"]) for r in hybrid_checkpoint.rate_table]
    windows = calibration_samples(out.tokenizer(), data_dir / C4_SAMPLE, 16, 32, 0)

    def loss(ckpt: Checkpoint, rate: float) -> float:
        with torch.no_grad():
            logits = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(windows)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()

    for rate in hybrid_checkpoint.rates:
        assert loss(out, rate) < loss(hybrid_checkpoint, rate) - 0.05, rate
    with pytest.raises(RecoverError, match="LoRAShear.*SSM groups \\(ssm_n, ssm_p\\).*nested method"):
        recover_checkpoint(hybrid_checkpoint.path, tmp_path / "s.elastiq", RecoverOptions(method="lorashear"),
                           data=data_dir)
    assert not (tmp_path / "s.elastiq").exists()

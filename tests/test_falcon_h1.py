"""Falcon-H1, a hybrid whose every block runs attention and a Mamba2 mixer side by side, then an
MLP, with muP multipliers that intake folds into the weights: its family description, the folded
model against transformers', sorting into a nested checkpoint, and every rate in float and 4-bit,
switched in place (tiny random models, built offline)."""

from __future__ import annotations

import pytest
import torch

from conftest import compressed, quantized
from hybrid_checks import (every_rate_is_its_slice, llama_cpp_plans, masks_compute_every_slice,
                           planner_counts_what_the_engine_holds, switches_as_fresh_loads)
from test_ssm import randomize

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, QK, SSM_N, SSM_P, VO, Checkpoint
from elastiq.families import config_dict, family_for
from elastiq.families.base import PARALLEL
from elastiq.families.falcon_h1 import FALCON_H1, fold_multipliers

HIDDEN = 128
# muP multipliers away from 1, as Falcon-H1's releases have them
MULTIPLIERS = dict(embedding_multiplier=5.6, lm_head_multiplier=0.04, key_multiplier=0.39, attention_in_multiplier=1.3,
                   attention_out_multiplier=0.9, ssm_in_multiplier=0.8, ssm_out_multiplier=0.6,
                   ssm_multipliers=[0.4, 0.6, 0.3, 0.7, 1.5], mlp_multipliers=[0.88, 0.59])


def falcon_h1_config(vocab_size: int, **extra):
    from transformers import FalconH1Config

    # 2 attention heads beside 4 SSM heads, as real releases have counts that differ
    fields = dict(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  intermediate_size=512, mamba_n_heads=4, mamba_d_head=64, mamba_d_ssm=256, mamba_n_groups=2,
                  mamba_d_state=64, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=False,
                  mamba_norm_before_gate=False, vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, **MULTIPLIERS)
    return FalconH1Config(**{**fields, **extra})


def build_falcon_h1(vocab_size: int, seed: int = 0, **extra):
    """A random Falcon-H1 (its mixers' states carrying much of their output, ``test_ssm.randomize``)."""
    from transformers import FalconH1ForCausalLM

    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(falcon_h1_config(vocab_size, **extra)).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.pre_ff_layernorm.weight.uniform_(0.5, 1.5)
            randomize(block.mamba)
            for p in (*block.self_attn.parameters(), *block.feed_forward.parameters()):
                p.normal_(0, 0.08)
        model.lm_head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def falcon_folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("falcon_h1")
    build_falcon_h1(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def falcon_checkpoint(falcon_folder, data_dir, tmp_path_factory) -> Checkpoint:
    return compressed(falcon_folder, data_dir, tmp_path_factory.mktemp("falcon-ckpt") / "f.elastiq")


@pytest.fixture(scope="module")
def falcon_q4(falcon_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    return quantized(falcon_checkpoint, data_dir, tmp_path_factory.mktemp("falcon-q4") / "q4.elastiq")


def test_the_family_describes_its_parallel_blocks(tokenizer):
    model = fold_multipliers(build_falcon_h1(len(tokenizer)))
    config = config_dict(model.config)
    family = family_for(config)
    assert family is FALCON_H1
    family.check(config)
    assert family.layer_kinds(config) == [PARALLEL] * 3
    assert [g.kind for g in family.groups(config, 0)] == [SSM_P, SSM_N, MLP, QK, VO]
    described = {name: shape for name, shape in family.shapes(config).items() if not name.endswith("rope_pairs")}
    assert described == {name: tuple(t.shape) for name, t in model.state_dict().items()}  # no gated norm


@pytest.mark.parametrize("change, field", [
    ({"mamba_n_heads": 3}, "mamba_n_groups"),
    ({"mamba_d_ssm": 200}, "mamba_d_ssm"),
    ({"mamba_rms_norm": True, "mamba_norm_before_gate": True}, "mamba_norm_before_gate"),
])
def test_a_bad_falcon_h1_config_names_the_field(tokenizer, change, field):
    config = {**config_dict(fold_multipliers(build_falcon_h1(len(tokenizer))).config), **change}
    with pytest.raises(ElastiqError, match=field):
        family_for(config).check(config)


def test_an_unfolded_config_is_refused(tokenizer):
    """The runtime computes without multipliers: a config that still has them is not run."""
    config = config_dict(build_falcon_h1(len(tokenizer)).config)
    with pytest.raises(ElastiqError, match="embedding_multiplier.*folds"):
        family_for(config).check(config)


@torch.no_grad()
@pytest.mark.parametrize("gated_norm, heads", [(False, {}), (True, {}),
                                               (False, dict(num_attention_heads=4, num_key_value_heads=2))])
def test_folded_and_elastic_models_compute_what_transformers_computes(tokenizer, ids, gated_norm, heads):
    """Folding the multipliers keeps transformers' logits; the elastic model computes them, full
    pass and token by token, with the mixers gated alone or gated and normalised, with fewer
    attention heads than SSM heads (the block holds both counts: they once shared one name, and
    the benchmark's Falcon-H1-0.5B shapes, 8 attention and 24 SSM heads, failed) and as many."""
    from elastiq.modeling.model import Transformer

    model = build_falcon_h1(len(tokenizer), mamba_rms_norm=gated_norm, **heads)
    want = model(ids).logits
    folded = fold_multipliers(model)
    assert torch.allclose(folded(ids).logits, want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic = Transformer.from_hf(folded)
    assert torch.allclose(elastic(ids), want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic.setup_caches(1, ids.shape[1])
    steps = [elastic(ids[:, :9], start=0)] + [elastic(ids[:, t:t + 1], start=t) for t in range(9, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5 * want.abs().max(), rtol=0)


def test_sorting_keeps_the_model_and_every_rate_is_its_slice(falcon_checkpoint, falcon_folder, ids):
    from transformers import FalconH1ForCausalLM

    assert {g.kind for g in falcon_checkpoint.groups} == {SSM_P, SSM_N, MLP, QK, VO}
    with torch.no_grad():
        source = FalconH1ForCausalLM.from_pretrained(falcon_folder).eval()(ids).logits
    every_rate_is_its_slice(falcon_checkpoint, source, ids)


@pytest.mark.parametrize("method", ["magnitude", "ridge"])
def test_the_baseline_orders_sort_mixers_without_a_norm(method, falcon_folder, data_dir, tmp_path, ids):
    """The magnitude and plain ridge orders of a mixer gated without a norm (the benchmark's random
    Falcon-H1 once failed on magnitude, which read the norm's weight); the model stays the same."""
    from transformers import FalconH1ForCausalLM

    from elastiq.compressor.compress import CompressOptions, compress

    options = CompressOptions(rates=(0.35,), calib_samples=2, calib_seqlen=32, quality_windows=0, method=method)
    ckpt = Checkpoint(compress(falcon_folder, tmp_path / "m.elastiq", options, data=data_dir, progress=False))
    with torch.no_grad():
        source = FalconH1ForCausalLM.from_pretrained(falcon_folder).eval()(ids).logits
    every_rate_is_its_slice(ckpt, source, ids)


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_engine_runs_and_switches_each_rate_as_a_fresh_load(which, falcon_checkpoint, falcon_q4, ids):
    switches_as_fresh_loads(falcon_checkpoint if which == "float" else falcon_q4, ids, float32=which == "float")


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_planner_counts_what_the_engine_holds(which, falcon_checkpoint, falcon_q4):
    """Each block holds both a KV cache and a recurrent state."""
    planner_counts_what_the_engine_holds(falcon_checkpoint if which == "float" else falcon_q4)


def test_recovery_masks_compute_every_slice_of_a_falcon_h1(falcon_checkpoint, ids):
    """LoRA on the mixer's six projections, attention's four and the MLP's three of every block; the
    mixers' P is masked at their gate, which has no norm."""
    assert len(masks_compute_every_slice(falcon_checkpoint, FALCON_H1, ids)) == 3 * 13


def test_exports_refuse_a_falcon_h1_naming_what_runs_it(falcon_checkpoint, tmp_path):
    """ONNX does not build Falcon-H1's parallel blocks (GGUF and Hugging Face do:
    test_export_falcon_h1): it says so, naming those, before writing anything."""
    from elastiq.exporters import export

    with pytest.raises(ElastiqError, match="falcon_h1 model has Mamba2 blocks.*--format gguf: llama.cpp's falcon-h1"
                                           ".*--format hf"):
        export(falcon_checkpoint.path, 0.0, "onnx", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_plans_what_its_falcon_h1_holds(falcon_q4, tmp_path):
    """llama.cpp's falcon-h1 holds an f16 KV cache (full head size, the context rounded up to 256
    cells) and one sequence's float32 mixer state in every block, at the rate's widest P and N: the
    footprint says so before and after the export (its weights within 2% of the file), llama.cpp's
    own account of its memory agrees, and the engine goes on from its state only."""
    import shutil

    pytest.importorskip("llama_cpp")
    from elastiq.runtime.backends.llamacpp import LLAMA_CTX_PAD

    ckpt = Checkpoint(shutil.copytree(falcon_q4.path, tmp_path / "f.elastiq"))
    config, rate, ctx = ckpt.config, ckpt.rates[-1], 100
    widths, layers = ckpt.rate_entry(rate)["widths"], config["num_hidden_layers"]
    P = max(widths[f"layers.{i}.ssm_p"] for i in range(layers))
    N = max(widths[f"layers.{i}.ssm_n"] for i in range(layers))
    H, G, K = config["mamba_n_heads"], config["mamba_n_groups"], config["mamba_d_conv"]
    kv = LLAMA_CTX_PAD * layers * 2 * config["num_key_value_heads"] * config["head_dim"] * 2
    states = layers * 4 * ((K - 1) * (H * P + 2 * G * N) + H * P * N)
    llama_cpp_plans(ckpt, rate, ctx, kv, states, tmp_path)

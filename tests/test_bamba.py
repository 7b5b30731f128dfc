"""Bamba, a hybrid of Mamba2 + MLP blocks and attention + MLP blocks with partial RoPE, through the
pipeline: its family description, sorting into a nested checkpoint, and that checkpoint at every
rate, in float and 4-bit, switched in place (tiny random models, built offline)."""

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
from elastiq.families.bamba import BAMBA
from elastiq.families.base import ATTENTION, SSM_MLP
from elastiq.families.mamba2 import split_mixers
from elastiq.families.partial_rope import partial_heads_back, turn_whole_heads, whole_head_order

HIDDEN = 128


def bamba_config(vocab_size: int, **extra):
    from transformers import BambaConfig

    fields = dict(hidden_size=HIDDEN, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=512, mamba_n_heads=4, mamba_d_head=64,
                  mamba_n_groups=2, mamba_d_state=64, mamba_d_conv=4, mamba_chunk_size=16, mamba_expand=2,
                  vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return BambaConfig(**{**fields, **extra})


def build_bamba(vocab_size: int, seed: int = 0, **extra):
    """A random Bamba whose mixers' states carry much of their output (``test_ssm.randomize``) and
    whose other weights are far from transformers' initialisation."""
    from transformers import BambaForCausalLM

    torch.manual_seed(seed)
    model = BambaForCausalLM(bamba_config(vocab_size, **extra)).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.pre_ff_layernorm.weight.uniform_(0.5, 1.5)
            if block.block_type == "linear_attention":
                randomize(block.mamba)
            else:
                for p in block.self_attn.parameters():
                    p.normal_(0, 0.08)
            for p in block.feed_forward.parameters():
                p.normal_(0, 0.08)
        model.lm_head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def bamba_folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("bamba")
    build_bamba(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bamba_checkpoint(bamba_folder, data_dir, tmp_path_factory) -> Checkpoint:
    return compressed(bamba_folder, data_dir, tmp_path_factory.mktemp("bamba-ckpt") / "b.elastiq")


@pytest.fixture(scope="module")
def bamba_q4(bamba_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    return quantized(bamba_checkpoint, data_dir, tmp_path_factory.mktemp("bamba-q4") / "q4.elastiq")


def test_the_family_describes_each_kind_of_block(tokenizer):
    config = config_dict(bamba_config(len(tokenizer)))
    family = family_for(config)
    assert family is BAMBA
    family.check(config)
    assert family.layer_kinds(config) == [SSM_MLP, ATTENTION, SSM_MLP]
    assert [[g.kind for g in family.groups(config, i)] for i in range(3)] == [
        [SSM_P, SSM_N, MLP], [MLP, QK, VO], [SSM_P, SSM_N, MLP]]
    model = split_mixers(build_bamba(len(tokenizer)))
    described = {name: shape for name, shape in family.shapes(config).items()
                 if not name.endswith("rope_pairs")}  # written by sorting
    assert described == {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("change, field", [
    ({"attn_layer_indices": [5]}, "attn_layer_indices"),
    ({"mamba_n_heads": 3}, "mamba_n_groups"),
    ({"mamba_expand": 3}, "mamba_expand"),
    ({"num_experts": 4}, "num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_a_bad_bamba_config_names_the_field(tokenizer, change, field):
    config = {**config_dict(bamba_config(len(tokenizer))), **change}
    with pytest.raises(ElastiqError, match=field):
        family_for(config).check(config)


def test_whole_head_order_pairs_the_passing_channels():
    """A head of 12 channels whose first 4 turn (pairs (0, 2), (1, 3)) and whose 8 others pass:
    laid out whole, pair j is channels (j, j + 6); pairs 2..5 are the passing channels 4..11."""
    order = whole_head_order(12, 4)
    assert order.tolist() == [0, 1, 4, 5, 6, 7, 2, 3, 8, 9, 10, 11]
    assert [(order[j].item(), order[j + 6].item()) for j in range(6)] == [(0, 2), (1, 3), (4, 8), (5, 9), (6, 10),
                                                                          (7, 11)]
    assert whole_head_order(8, 8).tolist() == list(range(8))  # whole-head RoPE: nothing moves


@torch.no_grad()
def test_partial_rope_laid_out_whole_computes_the_same(tokenizer, ids):
    """Intake's layout moves q/k channels and gives the passing pairs frequency 0: transformers'
    own model computes the same logits, and the export's inverse gives back the source's tensors."""
    model = build_bamba(len(tokenizer))
    want = model(ids).logits
    before = {k: v.clone() for k, v in split_mixers(model).state_dict().items()}
    turned = turn_whole_heads(model, BAMBA)
    assert model.model.rotary_emb.inv_freq.shape == (16,) and (model.model.rotary_emb.inv_freq[8:] == 0).all()
    moved = {k for k, v in turned.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"}
    assert torch.allclose(turned(ids).logits, want, atol=1e-5 * want.abs().max(), rtol=0)
    back = partial_heads_back(turned.state_dict(), config_dict(turned.config), BAMBA)
    assert all(torch.equal(back[k], v) for k, v in before.items())


@torch.no_grad()
def test_the_elastic_model_computes_what_transformers_computes(tokenizer, ids):
    """Partial RoPE included (heads laid out whole, as intake lays them): a full pass, and prefill
    then token by token through the KV caches and recurrent states."""
    from elastiq.modeling.model import Transformer

    model = build_bamba(len(tokenizer))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    want = model(ids).logits
    elastic = Transformer.from_hf(turn_whole_heads(split_mixers(model), BAMBA))
    assert torch.allclose(elastic(ids), want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic.setup_caches(1, ids.shape[1])
    steps = [elastic(ids[:, :9], start=0)] + [elastic(ids[:, t:t + 1], start=t) for t in range(9, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5 * want.abs().max(), rtol=0)


def test_sorting_keeps_the_model_and_every_rate_is_its_slice(bamba_checkpoint, bamba_folder, ids):
    from transformers import BambaForCausalLM

    assert {g.kind for g in bamba_checkpoint.groups} == {SSM_P, SSM_N, MLP, QK, VO}
    with torch.no_grad():
        source = BambaForCausalLM.from_pretrained(bamba_folder).eval()(ids).logits
    every_rate_is_its_slice(bamba_checkpoint, source, ids)


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_engine_runs_and_switches_each_rate_as_a_fresh_load(which, bamba_checkpoint, bamba_q4, ids):
    switches_as_fresh_loads(bamba_checkpoint if which == "float" else bamba_q4, ids, float32=which == "float")


def test_recovery_masks_compute_every_slice_of_a_bamba(bamba_checkpoint, ids):
    """LoRA in every projection: the mixers' six and the MLPs' three of a Mamba2 + MLP block,
    attention's four and its MLP's three."""
    mlp = ("ffn_down", "ffn_gate", "ffn_up")
    mixer = ("ssm_in_b", "ssm_in_c", "ssm_in_dt", "ssm_in_x", "ssm_in_z", "ssm_out")
    assert masks_compute_every_slice(bamba_checkpoint, BAMBA, ids) == {
        *(f"layers.{i}.{s}" for i in (0, 2) for s in (*mixer, *mlp)),
        *(f"layers.1.{s}" for s in ("attn_k", "attn_output", "attn_q", "attn_v", *mlp))}


def test_nested_recovery_of_a_bamba_lowers_the_loss_at_every_rate(bamba_checkpoint, data_dir, tmp_path):
    import torch.nn.functional as F

    from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
    from elastiq.compressor.recover import RecoverOptions, recover_checkpoint
    from elastiq.modeling.model import Transformer

    options = RecoverOptions(steps=8, lr=1e-2, rank=4, alpha=8.0, batch=4, seqlen=32, samples=16, heldout=2,
                             lm_weight=1.0, bf16=False)
    out = Checkpoint(recover_checkpoint(bamba_checkpoint.path, tmp_path / "r.elastiq", options, data=data_dir,
                                        progress=False))
    windows = calibration_samples(out.tokenizer(), data_dir / C4_SAMPLE, 16, 32, 0)

    def loss(ckpt: Checkpoint, rate: float) -> float:
        with torch.no_grad():
            logits = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(windows)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()

    for rate in bamba_checkpoint.rates:
        assert loss(out, rate) < loss(bamba_checkpoint, rate) - 0.05, rate


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_planner_counts_what_the_engine_holds(which, bamba_checkpoint, bamba_q4):
    planner_counts_what_the_engine_holds(bamba_checkpoint if which == "float" else bamba_q4)

def test_llama_cpp_plans_what_its_granitehybrid_holds(bamba_q4, tmp_path):
    """llama.cpp's granitehybrid holds an f16 KV cache (full head size, the context rounded up to 256
    cells) for the attention block alone and one sequence's float32 state for each mixer, at the
    unpruned P (its inner size is twice the hidden size) and the rate's widest N: the footprint says
    so before and after the export (its weights within 2% of the file), llama.cpp's own account of
    its memory agrees, and the engine goes on from its state only."""
    import shutil

    pytest.importorskip("llama_cpp")
    from elastiq.runtime.backends.llamacpp import LLAMA_CTX_PAD

    ckpt = Checkpoint(shutil.copytree(bamba_q4.path, tmp_path / "b.elastiq"))
    config, rate, ctx = ckpt.config, ckpt.rates[-1], 100
    widths = ckpt.rate_entry(rate)["widths"]
    mixers = [i for i in range(config["num_hidden_layers"]) if i not in config["attn_layer_indices"]]
    P, N = config["mamba_d_head"], max(widths[f"layers.{i}.ssm_n"] for i in mixers)
    H, G, K = config["mamba_n_heads"], config["mamba_n_groups"], config["mamba_d_conv"]
    kv = LLAMA_CTX_PAD * len(config["attn_layer_indices"]) * 2 * config["num_key_value_heads"] * 32 * 2
    states = len(mixers) * 4 * ((K - 1) * (H * P + 2 * G * N) + H * P * N)
    llama_cpp_plans(ckpt, rate, ctx, kv, states, tmp_path)


def test_partial_rope_of_a_scaled_type_is_refused(tokenizer):
    """A passing pair turns at angle 0 only where cos is 1 and the frequencies stay fixed: a
    dynamic or yarn RoPE over part of each head is refused, naming the types that run."""
    config = config_dict(bamba_config(len(tokenizer)))
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ElastiqError, match=r"turns 16 of each head's 32 channels \(partial RoPE\) with dynamic RoPE; "
                                           r"elastiq runs partial RoPE of the types default, linear, llama3"):
        BAMBA.check(config)

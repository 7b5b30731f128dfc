"""Bamba, a hybrid of Mamba2 + MLP blocks and attention + MLP blocks with partial RoPE, through the
pipeline: its family description, sorting into a nested checkpoint, and that checkpoint at every
rate, in float and 4-bit, switched in place (tiny random models, built offline)."""

from __future__ import annotations

import pytest
import torch

from test_nemotron_h import sliced
from test_ssm import randomize

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, SSM_N, SSM_P, VO, Checkpoint
from elastiq.families import config_dict, family_for
from elastiq.families.bamba import BAMBA
from elastiq.families.base import ATTENTION, SSM_MLP
from elastiq.families.mamba2 import split_mixers

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
    from elastiq.compressor.compress import CompressOptions, compress

    out = tmp_path_factory.mktemp("bamba-ckpt") / "b.elastiq"
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=40, quality_windows=2)
    return Checkpoint(compress(bamba_folder, out, options, data=data_dir, progress=False))


@pytest.fixture(scope="module")
def bamba_q4(bamba_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("bamba-q4") / "q4.elastiq"
    return Checkpoint(quantize_checkpoint(bamba_checkpoint.path, out, QuantizeOptions(), data=data_dir,
                                          progress=False))


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    from conftest import TEXT

    return torch.tensor([tokenizer.encode(TEXT + " " + TEXT)])


def test_the_family_describes_each_kind_of_block(tokenizer):
    config = config_dict(bamba_config(len(tokenizer)))
    family = family_for(config)
    assert family is BAMBA
    family.check(config)
    assert family.layer_kinds(config) == [SSM_MLP, ATTENTION, SSM_MLP]
    assert [[g.kind for g in family.groups(config, i)] for i in range(3)] == [
        [SSM_P, SSM_N, MLP], [MLP, VO], [SSM_P, SSM_N, MLP]]
    model = split_mixers(build_bamba(len(tokenizer)))
    described = {name: shape for name, shape in family.shapes(config).items()
                 if not name.endswith("rope_pairs")}  # written by sorting where q/k pairs are pruned: not here
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


@torch.no_grad()
def test_the_elastic_model_computes_what_transformers_computes(tokenizer, ids):
    """Partial RoPE included: a full pass, and prefill then token by token through the KV caches
    and recurrent states."""
    from elastiq.modeling.model import Transformer

    model = build_bamba(len(tokenizer))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    want = model(ids).logits
    elastic = Transformer.from_hf(split_mixers(model))
    assert torch.allclose(elastic(ids), want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic.setup_caches(1, ids.shape[1])
    steps = [elastic(ids[:, :9], start=0)] + [elastic(ids[:, t:t + 1], start=t) for t in range(9, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5 * want.abs().max(), rtol=0)


@torch.no_grad()
def test_sorting_keeps_the_model_and_every_rate_is_its_slice(bamba_checkpoint, bamba_folder, ids):
    from transformers import BambaForCausalLM

    from elastiq.modeling.model import Transformer

    ckpt = bamba_checkpoint
    assert {g.kind for g in ckpt.groups} == {SSM_P, SSM_N, MLP, VO}
    full = ckpt.read_rate(0.0)
    want = BambaForCausalLM.from_pretrained(bamba_folder).eval()(ids).logits
    got = Transformer.from_weights(full, ckpt.config)(ids)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0), (got - want).abs().max()
    for rate in (0.15, 0.35):
        read = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        cut = Transformer.from_weights(sliced(full, ckpt, rate), ckpt.config)(ids)
        assert torch.equal(read, cut)
        assert not torch.allclose(read, want, atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_engine_runs_and_switches_each_rate_as_a_fresh_load(which, bamba_checkpoint, bamba_q4, ids):
    """An engine switched in place (0 -> 0.35 -> 0.15 -> 0) computes what a fresh one does, bit for bit."""
    from elastiq.modeling.model import Transformer
    from elastiq.runtime.engine import Engine

    ckpt = bamba_checkpoint if which == "float" else bamba_q4
    switched = Engine(ckpt, 0.0, ctx=64, dtype=torch.float32 if which == "float" else None)
    for rate in (0.0, 0.35, 0.15, 0.0):
        switched.set_rate(rate)
        got = switched.logits(ids)
        assert torch.equal(got, Engine(ckpt, rate, ctx=64, dtype=switched.dtype).logits(ids)), rate
        if which == "float":  # unit order sums the output projections' inputs in another order
            want = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), rate


def test_recovery_masks_compute_every_slice_of_a_bamba(bamba_checkpoint, ids):
    """With LoRA in every projection (the mixers' six and the MLPs' three of a Mamba2 + MLP block,
    attention's four and its MLP's three), the masked full model computes each rate's slice of the
    merged weights; unmasked it is the full model."""
    from elastiq.compressor.recover import UnitMasks, lora_model, merged_weights, width_units
    from elastiq.modeling.model import Transformer

    ckpt, weights = bamba_checkpoint, bamba_checkpoint.read_rate(0.0)
    model = lora_model(weights, ckpt.config, rank=4, alpha=8.0, seed=0)
    wrapped = {name.partition(".lora_B")[0] for name, _ in model.named_parameters() if "lora_B" in name}
    mlp = ("ffn_down", "ffn_gate", "ffn_up")
    mixer = ("ssm_in_b", "ssm_in_c", "ssm_in_dt", "ssm_in_x", "ssm_in_z", "ssm_out")
    assert wrapped == {*(f"layers.{i}.{s}" for i in (0, 2) for s in (*mixer, *mlp)),
                       *(f"layers.1.{s}" for s in ("attn_k", "attn_output", "attn_q", "attn_v", *mlp))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        merged = merged_weights(model, weights, BAMBA)
        full = model(ids)
        masks = UnitMasks(model, ckpt.groups, ckpt.heads)
        for rate in ckpt.rates:
            masks.set(width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(rate)["widths"]))
            expected = Transformer.from_weights(sliced(merged, ckpt, rate), ckpt.config)(ids)
            assert (model(ids) - expected).abs().max() < 1e-4 * expected.abs().max(), rate
        masks.set(None)
        assert torch.equal(model(ids), full)


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
    """The torch footprint of each rate: its weights and cache (the attention block's KV, the
    mixers' states, constant in the context) are what the engine holds, to the byte."""
    from elastiq.modeling.ssm import SSMState
    from elastiq.runtime.engine import Engine
    from elastiq.runtime.memory import predict_footprint

    ckpt = bamba_checkpoint if which == "float" else bamba_q4
    for rate in ckpt.rates:
        engine = Engine(ckpt, rate, ctx=64)
        f = predict_footprint(ckpt, rate, 64, engine.dtype, engine.int4, baseline=0)
        kv = sum(layer.kv_cache.k.nbytes + layer.kv_cache.v.nbytes for layer in engine.model.layers
                 if getattr(layer, "kv_cache", None) is not None)
        states = sum(m.conv.nbytes + m.ssm.nbytes for m in engine.model.modules() if isinstance(m, SSMState))
        assert kv > 0 and states > 0
        assert (f.weights, f.kv_cache) == (engine.weight_bytes(), kv + states), rate
        longer = predict_footprint(ckpt, rate, 128, engine.dtype, engine.int4, baseline=0)
        assert longer.kv_cache - f.kv_cache == kv, rate

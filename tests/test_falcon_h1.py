"""Falcon-H1, a hybrid whose every block runs attention and a Mamba2 mixer side by side, then an
MLP, with muP multipliers that intake folds into the weights: its family description, the folded
model against transformers', sorting into a nested checkpoint, and every rate in float and 4-bit,
switched in place (tiny random models, built offline)."""

from __future__ import annotations

import pytest
import torch

from test_nemotron_h import sliced
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

    fields = dict(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
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
    from elastiq.compressor.compress import CompressOptions, compress

    out = tmp_path_factory.mktemp("falcon-ckpt") / "f.elastiq"
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=40, quality_windows=2)
    return Checkpoint(compress(falcon_folder, out, options, data=data_dir, progress=False))


@pytest.fixture(scope="module")
def falcon_q4(falcon_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("falcon-q4") / "q4.elastiq"
    return Checkpoint(quantize_checkpoint(falcon_checkpoint.path, out, QuantizeOptions(), data=data_dir,
                                          progress=False))


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    from conftest import TEXT

    return torch.tensor([tokenizer.encode(TEXT + " " + TEXT)])


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
@pytest.mark.parametrize("gated_norm", [False, True])
def test_folded_and_elastic_models_compute_what_transformers_computes(tokenizer, ids, gated_norm):
    """Folding the multipliers keeps transformers' logits; the elastic model computes them, full
    pass and token by token, with the mixers gated alone or gated and normalised."""
    from elastiq.modeling.model import Transformer

    model = build_falcon_h1(len(tokenizer), mamba_rms_norm=gated_norm)
    want = model(ids).logits
    folded = fold_multipliers(model)
    assert torch.allclose(folded(ids).logits, want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic = Transformer.from_hf(folded)
    assert torch.allclose(elastic(ids), want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic.setup_caches(1, ids.shape[1])
    steps = [elastic(ids[:, :9], start=0)] + [elastic(ids[:, t:t + 1], start=t) for t in range(9, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5 * want.abs().max(), rtol=0)


@torch.no_grad()
def test_sorting_keeps_the_model_and_every_rate_is_its_slice(falcon_checkpoint, falcon_folder, ids):
    from transformers import FalconH1ForCausalLM

    from elastiq.modeling.model import Transformer

    ckpt = falcon_checkpoint
    assert {g.kind for g in ckpt.groups} == {SSM_P, SSM_N, MLP, QK, VO}
    full = ckpt.read_rate(0.0)
    want = FalconH1ForCausalLM.from_pretrained(falcon_folder).eval()(ids).logits
    got = Transformer.from_weights(full, ckpt.config)(ids)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0), (got - want).abs().max()
    for rate in (0.15, 0.35):
        read = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        cut = Transformer.from_weights(sliced(full, ckpt, rate), ckpt.config)(ids)
        assert torch.equal(read, cut)
        assert not torch.allclose(read, want, atol=1e-2)


@torch.no_grad()
@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_engine_runs_and_switches_each_rate_as_a_fresh_load(which, falcon_checkpoint, falcon_q4, ids):
    """An engine switched in place (0 -> 0.35 -> 0.15 -> 0) computes what a fresh one does, bit for bit."""
    from elastiq.modeling.model import Transformer
    from elastiq.runtime.engine import Engine

    ckpt = falcon_checkpoint if which == "float" else falcon_q4
    switched = Engine(ckpt, 0.0, ctx=64, dtype=torch.float32 if which == "float" else None)
    for rate in (0.0, 0.35, 0.15, 0.0):
        switched.set_rate(rate)
        got = switched.logits(ids)
        assert torch.equal(got, Engine(ckpt, rate, ctx=64, dtype=switched.dtype).logits(ids)), rate
        if which == "float":  # unit order sums the output projections' inputs in another order
            want = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), rate


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_planner_counts_what_the_engine_holds(which, falcon_checkpoint, falcon_q4):
    """Each block holds both a KV cache and a recurrent state: the torch footprint's weights and
    cache are what the engine holds, to the byte, and only the KV part grows with the context."""
    from elastiq.modeling.ssm import SSMState
    from elastiq.runtime.engine import Engine
    from elastiq.runtime.memory import predict_footprint

    ckpt = falcon_checkpoint if which == "float" else falcon_q4
    for rate in ckpt.rates:
        engine = Engine(ckpt, rate, ctx=64)
        f = predict_footprint(ckpt, rate, 64, engine.dtype, engine.int4, baseline=0)
        kv = sum(layer.kv_cache.k.nbytes + layer.kv_cache.v.nbytes for layer in engine.model.layers)
        states = sum(m.conv.nbytes + m.ssm.nbytes for m in engine.model.modules() if isinstance(m, SSMState))
        assert (f.weights, f.kv_cache) == (engine.weight_bytes(), kv + states), rate
        longer = predict_footprint(ckpt, rate, 128, engine.dtype, engine.int4, baseline=0)
        assert longer.kv_cache - f.kv_cache == kv, rate


def test_recovery_masks_compute_every_slice_of_a_falcon_h1(falcon_checkpoint, ids):
    """LoRA on the mixer's six projections, attention's four and the MLP's three of every block; the
    masked full model computes each rate's slice of the merged weights (the mixers' P masked at
    their gate, which has no norm), and unmasked it is the full model."""
    from elastiq.compressor.recover import UnitMasks, lora_model, merged_weights, width_units
    from elastiq.modeling.model import Transformer

    ckpt, weights = falcon_checkpoint, falcon_checkpoint.read_rate(0.0)
    model = lora_model(weights, ckpt.config, rank=4, alpha=8.0, seed=0)
    wrapped = {name.partition(".lora_B")[0] for name, _ in model.named_parameters() if "lora_B" in name}
    assert len(wrapped) == 3 * 13
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        merged = merged_weights(model, weights, FALCON_H1)
        full = model(ids)
        masks = UnitMasks(model, ckpt.groups, ckpt.heads)
        for rate in ckpt.rates:
            masks.set(width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(rate)["widths"]))
            expected = Transformer.from_weights(sliced(merged, ckpt, rate), ckpt.config)(ids)
            assert (model(ids) - expected).abs().max() < 1e-4 * expected.abs().max(), rate
        masks.set(None)
        assert torch.equal(model(ids), full)


@pytest.mark.parametrize("form", ["gguf", "hf", "onnx"])
def test_exports_refuse_a_falcon_h1_naming_what_runs_it(form, falcon_checkpoint, tmp_path):
    """No export of Falcon-H1's parallel blocks is built: each says so, before writing anything."""
    from elastiq.exporters import export

    with pytest.raises(ElastiqError, match="falcon_h1|Falcon-H1|parallel|attention \\+ MLP"):
        export(falcon_checkpoint.path, 0.0, form, tmp_path / f"out.{form}")
    assert list(tmp_path.iterdir()) == []

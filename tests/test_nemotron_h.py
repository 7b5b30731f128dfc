"""Nemotron-H, a hybrid of Mamba2 mixers, attention without RoPE and ReLU² MLPs, one branch a
block, through the pipeline: its family description, sorting into a nested checkpoint, and that
checkpoint at every rate, in float and 4-bit, switched in place (tiny random models, built offline)."""

from __future__ import annotations

import pytest
import torch

from conftest import compressed, quantized
from hybrid_checks import every_rate_is_its_slice, switches_as_fresh_loads
from test_ssm import randomize

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, QK, SSM_N, SSM_P, VO, Checkpoint
from elastiq.families import config_dict, family_for
from elastiq.families.base import ATTENTION_ONLY, MLP_ONLY, SSM
from elastiq.families.mamba2 import split_mixers
from elastiq.families.nemotron_h import NEMOTRON_H

HIDDEN = 128
LAYERS = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]


def nemotron_h_config(vocab_size: int, **extra):
    from transformers import NemotronHConfig

    fields = dict(hidden_size=HIDDEN, layers_block_type=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=512, mamba_num_heads=4, mamba_head_dim=64, n_groups=2,
                  ssm_state_size=64, conv_kernel=4, chunk_size=16, vocab_size=vocab_size, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return NemotronHConfig(**{**fields, **extra})


def build_nemotron_h(vocab_size: int, seed: int = 0, **extra):
    """A random Nemotron-H whose mixers' states carry much of their output (``test_ssm.randomize``)
    and whose other weights are far from transformers' initialisation."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(nemotron_h_config(vocab_size, **extra)).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.norm.weight.uniform_(0.5, 1.5)
            if block.block_type == "linear_attention":
                randomize(block.mixer)
            else:
                for p in block.mixer.parameters():
                    p.normal_(0, 0.08)
        model.lm_head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def hybrid_folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron_h")
    build_nemotron_h(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hybrid_checkpoint(hybrid_folder, data_dir, tmp_path_factory) -> Checkpoint:
    return compressed(hybrid_folder, data_dir, tmp_path_factory.mktemp("nemotron_h-ckpt") / "h.elastiq")


@pytest.fixture(scope="module")
def hybrid_q4(hybrid_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    return quantized(hybrid_checkpoint, data_dir, tmp_path_factory.mktemp("nemotron_h-q4") / "q4.elastiq")


def test_the_family_describes_each_kind_of_block(tokenizer):
    config = config_dict(nemotron_h_config(len(tokenizer)))
    family = family_for(config)
    assert family is NEMOTRON_H
    family.check(config)
    assert family.layer_kinds(config) == [SSM, MLP_ONLY, ATTENTION_ONLY, MLP_ONLY, SSM]
    assert [[g.kind for g in family.groups(config, i)] for i in range(len(LAYERS))] == [
        [SSM_P, SSM_N], [MLP], [QK, VO], [MLP], [SSM_P, SSM_N]]
    mlp = family.groups(config, 1)[0]
    assert [name for name, _ in mlp.members] == ["model.layers.1.mixer.up_proj.weight",
                                                 "model.layers.1.mixer.down_proj.weight"]  # no gate
    model = split_mixers(build_nemotron_h(len(tokenizer)))
    described = {name: shape for name, shape in family.shapes(config).items()
                 if not name.endswith("rope_pairs")}  # written by sorting, which prunes q/k pairs
    assert described == {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("change, field", [
    ({"layers_block_type": ["linear_attention", "moe"]}, "mixture-of-experts"),
    ({"layers_block_type": ["linear_attention", "convolution"]}, "layers_block_type"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    ({"mamba_num_heads": 3}, "n_groups"),
    ({"num_hidden_layers": 9}, "num_hidden_layers"),
    ({"time_step_min": -0.1}, "time_step_min"),
])
def test_a_bad_nemotron_h_config_names_the_field(tokenizer, change, field):
    config = {**config_dict(nemotron_h_config(len(tokenizer))), **change}
    with pytest.raises(ElastiqError, match=field):
        family_for(config).check(config)


@torch.no_grad()
def test_the_elastic_model_computes_what_transformers_computes(tokenizer, ids):
    """A full pass, and prefill then token by token through the KV caches and recurrent states."""
    from elastiq.modeling.model import Transformer

    model = build_nemotron_h(len(tokenizer))
    want = model(ids).logits
    elastic = Transformer.from_hf(split_mixers(model))
    assert torch.allclose(elastic(ids), want, atol=1e-5 * want.abs().max(), rtol=0)
    elastic.setup_caches(1, ids.shape[1])
    steps = [elastic(ids[:, :9], start=0)] + [elastic(ids[:, t:t + 1], start=t) for t in range(9, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5 * want.abs().max(), rtol=0)


def test_sorting_keeps_the_model_and_every_rate_is_its_slice(hybrid_checkpoint, hybrid_folder, ids):
    from transformers import NemotronHForCausalLM

    ckpt = hybrid_checkpoint
    assert {g.kind for g in ckpt.groups} == {SSM_P, SSM_N, MLP, QK, VO}
    for rate in ckpt.rates[1:]:
        assert any(ckpt.rate_entry(rate)["widths"][g.name] < g.width for g in ckpt.groups if g.kind == MLP), rate
    with torch.no_grad():
        source = NemotronHForCausalLM.from_pretrained(hybrid_folder).eval()(ids).logits
    every_rate_is_its_slice(ckpt, source, ids)


def test_the_manifest_counts_the_kv_cache_of_the_attention_block_alone(hybrid_checkpoint):
    from elastiq.manifest import KV_DTYPES

    ckpt = hybrid_checkpoint
    itemsize = KV_DTYPES[ckpt.manifest["kv_cache_dtype"]]
    heads = ckpt.heads
    for rate in ckpt.rates:  # one attention block of 5: K its kept q/k pairs, V its kept rank
        widths = ckpt.rate_entry(rate)["widths"]
        kv = (2 * widths["layers.2.qk"] + widths["layers.2.vo"]) * heads.num_kv_heads * itemsize
        assert ckpt.rate_entry(rate)["kv_bytes_per_token"] == kv


@pytest.mark.parametrize("which", ["float", "q4"])
def test_the_engine_runs_and_switches_each_rate_as_a_fresh_load(which, hybrid_checkpoint, hybrid_q4, ids):
    switches_as_fresh_loads(hybrid_checkpoint if which == "float" else hybrid_q4, ids, float32=which == "float")
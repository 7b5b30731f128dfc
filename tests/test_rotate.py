"""Residual rotation: orthogonal matrices of any size, and rotated models that compute the same
logits (transformers and elastiq's runtime), with folded norms, an untied head, weights that
really moved, and an embedding outlier spread over all channels."""

from __future__ import annotations

import copy

import pytest
import torch

from elastiq import ElastiqError
from elastiq.compressor.rotate import random_orthogonal, rotate_residual
from elastiq.families import family_for
from elastiq.families.base import ATTN_Q, EMBED, FINAL_NORM, HEAD, NORM_READERS
from elastiq.modeling.model import Transformer
from conftest import build_tiny

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def ids(tokenizer, data_dir) -> torch.Tensor:
    """Two rows of 48 real WikiText-2 token ids."""
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    return torch.tensor(tokenizer.encode(text)[:96]).view(2, 48)


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with every norm weight in [0.5, 2) and every bias random, so folding and biases matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def family_of(model: torch.nn.Module):
    return family_for(model.config.to_dict())


def norms(model: torch.nn.Module) -> list[torch.Tensor]:
    family = family_of(model)
    return [family.top_module(model, FINAL_NORM).weight] + [family.part(layer, n).weight
                                                             for layer in family.blocks(model) for n in NORM_READERS]


@pytest.mark.parametrize("n", [64, 576, 96, 7])
def test_random_orthogonal_is_orthogonal_seeded_and_incoherent(n):
    q = random_orthogonal(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    assert torch.equal(q, random_orthogonal(n, seed=3))
    assert not torch.allclose(q, random_orthogonal(n, seed=4))
    power = n & -n  # the Walsh-Hadamard factor bounds every entry by 1/sqrt(2^k)
    assert q.abs().max() <= power ** -0.5 + 1e-12
    if n == power:
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_model_computes_the_same_logits(family, tokenizer, ids):
    """In transformers and in elastiq's runtime, with ones for norms and an untied head."""
    model = perturbed(build_tiny(family, tokenizer))
    before = logits(model, ids)
    assert before.abs().max() > 0.5  # so that 1e-4 is a tight tolerance
    desc = family_of(model)
    head, embed = desc.top_module(model, HEAD), desc.top_module(model, EMBED)
    assert head.weight is embed.weight
    if family == "qwen2":
        q_bias = desc.part(desc.blocks(model)[0], ATTN_Q).bias.clone()

    rotate_residual(model, desc, random_orthogonal(64, seed=0))

    after = logits(model, ids)
    assert (after - before).abs().max() < 1e-4
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms(model))
    assert head.weight is not embed.weight
    assert model.config.tie_word_embeddings is False
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    if family == "qwen2":  # on the output side of a reader: unchanged
        assert torch.equal(desc.part(desc.blocks(model)[0], ATTN_Q).bias, q_bias)
    runtime = Transformer.from_hf(model)
    assert not runtime.args.tie_word_embeddings
    assert (runtime(ids) - after).abs().max() < 1e-4


def test_writer_biases_are_rotated(tokenizer, ids):
    """Llama with attention and MLP biases: o_proj and down_proj biases sit in the residual stream."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama", len(tokenizer))
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    model = perturbed(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    before = logits(model, ids)
    rotate_residual(model, family_of(model), random_orthogonal(64, seed=0))
    assert (logits(model, ids) - before).abs().max() < 1e-4


def test_rotation_moves_the_weights_exactly_as_specified(tokenizer):
    """Against the identity (which only folds the norms): E Q, W Q for readers, Q^T W for writers."""
    folded = perturbed(build_tiny("llama", tokenizer))
    original_embedding = folded.model.embed_tokens.weight.clone()
    rotated = copy.deepcopy(folded)
    rotate_residual(folded, family_of(folded), torch.eye(64))
    q = random_orthogonal(64, seed=0)
    rotate_residual(rotated, family_of(rotated), q)

    assert torch.equal(folded.model.embed_tokens.weight, original_embedding)
    pairs = [(folded.model.embed_tokens.weight, rotated.model.embed_tokens.weight, "reader"),
             (folded.lm_head.weight, rotated.lm_head.weight, "reader")]
    for a, b in zip(folded.model.layers, rotated.model.layers):
        pairs += [(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight, "reader"),
                  (a.mlp.up_proj.weight, b.mlp.up_proj.weight, "reader"),
                  (a.self_attn.o_proj.weight, b.self_attn.o_proj.weight, "writer"),
                  (a.mlp.down_proj.weight, b.mlp.down_proj.weight, "writer")]
    for a, b, side in pairs:
        a64 = a.double()
        expected = a64 @ q if side == "reader" else q.T @ a64
        assert (b.double() - expected).abs().max() < 1e-6
        assert (b - a).abs().max() > 0.1 * a.abs().max()


def test_rotation_spreads_an_outlier_channel(tokenizer, ids):
    """A planted outlier (embedding column x50) stands out less in rotated embeddings and residual states."""
    model = perturbed(build_tiny("llama", tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 50

    def peakiness(x: torch.Tensor) -> float:
        """Mean over vectors (rows) of max |x| / mean |x|."""
        a = x.detach().abs().flatten(0, -2)
        return (a.amax(-1) / a.mean(-1)).mean().item()

    def states(m) -> list[torch.Tensor]:
        with torch.no_grad():
            return m(ids, output_hidden_states=True).hidden_states[:-1]  # block inputs; the last is normed

    embed_before = peakiness(model.model.embed_tokens.weight)
    states_before = [peakiness(h) for h in states(model)]
    rotate_residual(model, family_of(model), random_orthogonal(64, seed=0))
    embed_after = peakiness(model.model.embed_tokens.weight)
    states_after = [peakiness(h) for h in states(model)]
    print(f"max/mean |x| embeddings {embed_before:.1f} -> {embed_after:.1f}; residual stream per block "
          f"{[round(v, 1) for v in states_before]} -> {[round(v, 1) for v in states_after]}")
    assert embed_after * 3 < embed_before
    assert all(a * 3 < b for a, b in zip(states_after, states_before))


def test_bad_rotations_are_refused(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    family = family_of(model)
    with pytest.raises(ElastiqError, match=r"\(64, 64\)"):
        rotate_residual(model, family, random_orthogonal(32, seed=0))
    with pytest.raises(ElastiqError, match="not orthogonal"):
        rotate_residual(model, family, 2 * torch.eye(64))

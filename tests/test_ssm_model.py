"""The elastic model (elastiq.modeling.model.Transformer) of a Mamba2 causal LM against
transformers' Mamba2ForCausalLM: full and pruned widths, decoding through its recurrent states
(setup_caches, forward at a start), the rule that a state only goes on from where it is, and the
Generator's reuse of a cached prefix under that rule. float32 throughout; logits agree within
1e-4 of the largest logit."""

from __future__ import annotations

import pytest
import torch
from test_ssm import hf_config, randomize, sliced, split
from transformers import Mamba2ForCausalLM

from elastiq import ElastiqError
from elastiq.modeling.model import ModelArgs, SSMBlock, SSMLayerArgs, Transformer
from elastiq.runtime.generate import Generator

LAYERS, VOCAB = 2, 64
TOLERANCE = 1e-4  # of the largest logit


def causal_lm(seed: int = 0, **extra) -> Mamba2ForCausalLM:
    """A random 2-layer transformers Mamba2 LM at full width (test_ssm's mixer shape), every mixer
    randomized so that the state carries a large part of the output."""
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(hf_config(**extra)).eval()
    for layer in model.backbone.layers:
        randomize(layer.mixer)
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    with torch.no_grad():
        model.backbone.norm_f.weight.uniform_(0.5, 1.5)
    return model


def pruned_state(model: Mamba2ForCausalLM, p: int, n: int) -> dict[str, torch.Tensor]:
    """``model``'s tensors with every mixer cut to the first p channels of each head and n states of
    each group (transformers' names and layout)."""
    weights = model.state_dict()
    out = dict(weights)
    for i in range(LAYERS):
        prefix = f"backbone.layers.{i}.mixer."
        mixer = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in sliced(mixer, p, n).items()})
    return out


def runtime_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Mamba2ForCausalLM state dict under the elastic model's runtime names, each
    mixer's in_proj and conv1d split by part (written apart from the family's conversion)."""
    out = {"embed_tokens.weight": state["backbone.embeddings.weight"], "norm.weight": state["backbone.norm_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(LAYERS):
        prefix = f"backbone.layers.{i}."
        out[f"layers.{i}.attn_norm.weight"] = state[prefix + "norm.weight"]
        mixer = {k.removeprefix(prefix + "mixer."): v for k, v in state.items() if k.startswith(prefix + "mixer.")}
        out.update({f"layers.{i}.{k}": v for k, v in split(mixer).items()})
    return out


def elastic(state: dict[str, torch.Tensor], config: dict) -> Transformer:
    """The elastic model of runtime-named ``state`` and the (unpruned) model's config dict."""
    weights = runtime_weights(state)
    return Transformer(ModelArgs.from_weights(weights, config), weights, [None] * LAYERS, torch.float32).eval()


def assert_logits(ours: torch.Tensor, expected: torch.Tensor) -> None:
    err, scale = (ours - expected).abs().max().item(), expected.abs().max().item()
    assert err <= TOLERANCE * scale, f"max error {err:.3g} against max logit {scale:.3g}"


EXTRA = {"plain": {}, "biased": dict(use_bias=True, time_step_limit=(0.0, 0.5))}


@pytest.mark.parametrize("extra", EXTRA.values(), ids=EXTRA.keys())
@torch.no_grad()
def test_full_width_equals_transformers(extra):
    """Over 40 tokens (2.5 chunks), as transformers computes without a cache."""
    model = causal_lm(**extra)
    ours = elastic(model.state_dict(), model.config.to_dict())
    assert all(isinstance(layer, SSMBlock) for layer in ours.layers)
    assert ours.args.layers == (SSMLayerArgs(16, 16, ours.args.layers[0].biases),) * LAYERS
    assert ours.args.num_heads == 0 and ours.args.ssm.num_heads == 8 and ours.rope_groups == [None] * LAYERS
    assert ours.args.rms_norm_eps == model.config.layer_norm_epsilon
    biases = {"ssm_conv1d_x", "ssm_conv1d_b", "ssm_conv1d_c"}
    if extra:
        biases |= {"ssm_in_z", "ssm_in_x", "ssm_in_b", "ssm_in_c", "ssm_in_dt", "ssm_out"}
    assert ours.args.layers[0].biases == biases
    ids = torch.randint(0, VOCAB, (2, 40))
    assert_logits(ours(ids), model(ids, use_cache=False).logits)
    assert_logits(ours(ids, last_only=True), model(ids, use_cache=False).logits[:, -1:])


@pytest.mark.parametrize("p, n", [(12, 10), (4, 3)])
@pytest.mark.parametrize("extra", EXTRA.values(), ids=EXTRA.keys())
@torch.no_grad()
def test_pruned_widths_equal_transformers(p, n, extra):
    """Every mixer cut to (P', N'): transformers' model built at head_dim = P', state_size = N' on
    the same cut tensors; ours reads the widths off the shapes under the unpruned config."""
    model = causal_lm(seed=1, **extra)
    state = pruned_state(model, p, n)
    reference = Mamba2ForCausalLM(hf_config(p, n, **extra)).eval()
    reference.load_state_dict(state, strict=True)
    ours = elastic(state, model.config.to_dict())
    assert [(layer.head_dim, layer.state_size) for layer in ours.args.layers] == [(p, n)] * LAYERS
    ids = torch.randint(0, VOCAB, (2, 40))
    assert_logits(ours(ids), reference(ids, use_cache=False).logits)


@pytest.mark.parametrize("p, n", [(16, 16), (4, 3)])
@torch.no_grad()
def test_decoding_equals_the_full_pass(p, n):
    """Prefill 20 tokens at start 0, then 10 tokens one at a time; and again with the prefill in
    two calls, 10 + 15 tokens, the second across the chunk boundary at 16: each position's logits
    are the full pass's. The state is float32, of the block's widths."""
    model = causal_lm(seed=2)
    ours = elastic(pruned_state(model, p, n), model.config.to_dict())
    ids = torch.randint(0, VOCAB, (2, 30))
    full = ours(ids)
    ours.setup_caches(2, 64)
    for layer in ours.layers:
        assert layer.state.ssm.shape == (2, 8, p, n) and layer.state.conv.shape == (2, 8 * p + 2 * 2 * n, 4)
        assert layer.state.ssm.dtype == layer.state.conv.dtype == torch.float32
    for prefill in ([(0, 20)], [(0, 10), (10, 25)]):
        out = [ours(ids[:, a:b], start=a) for a, b in prefill]
        end = prefill[-1][1]
        out += [ours(ids[:, t:t + 1], start=t) for t in range(end, 30)]
        assert all(layer.state.position == 30 for layer in ours.layers)
        assert_logits(torch.cat(out, 1), full)


@torch.no_grad()
def test_a_state_cannot_go_back():
    """Any start but 0 or the state's position is refused before a block runs; a pass without a
    start leaves the states alone; start 0 restarts."""
    model = causal_lm(seed=3)
    ours = elastic(model.state_dict(), model.config.to_dict())
    ids = torch.randint(0, VOCAB, (1, 24))
    with pytest.raises(ElastiqError, match="setup_caches"):
        ours(ids[:, :4], start=0)
    ours.setup_caches(1, 64)
    ours(ids[:, :20], start=0)
    states = [(layer.state.conv.clone(), layer.state.ssm.clone()) for layer in ours.layers]
    assert ours.resumable(20) and ours.resumable(0)
    for start in (19, 5, 21):
        assert not ours.resumable(start)
        with pytest.raises(ElastiqError, match="cannot go back"):
            ours(ids[:, 20:21], start=start)
    full = ours(ids)  # no start: from a zero state, kept nowhere
    for layer, (conv, ssm) in zip(ours.layers, states):
        assert layer.state.position == 20 and torch.equal(layer.state.conv, conv) and torch.equal(layer.state.ssm, ssm)
    assert_logits(ours(ids[:, 20:], start=20), full[:, 20:])
    assert_logits(ours(ids[:, :8], start=0), full[:, :8])  # restarted
    assert all(layer.state.position == 8 for layer in ours.layers)
    ours.clear_caches()
    assert not ours.resumable(8)


@torch.no_grad()
def test_generator_resumes_only_where_the_state_is():
    """Greedy generation equals the argmax of full passes; a prompt that leaves the cached tokens
    mid-way is run from the start (the state cannot go back to the common prefix), and one that
    extends them goes on from the state."""
    model = causal_lm(seed=4)
    ours = elastic(model.state_dict(), model.config.to_dict())
    torch.manual_seed(5)

    def greedy(ids: list[int], n: int) -> list[int]:
        ids = list(ids)
        for _ in range(n):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
        return ids[-n:]

    generator = Generator(ours, 64)
    first = torch.randint(0, VOCAB, (12,)).tolist()
    stats = generator.generate(first, 8)
    assert stats.reused == 0 and stats.tokens == greedy(first, 8)
    assert len(set(stats.tokens)) > 1  # the output depends on the context
    diverging = first[:6] + [(first[6] + 1) % VOCAB] + torch.randint(0, VOCAB, (4,)).tolist()
    stats = generator.generate(diverging, 8)
    assert stats.reused == 0 and stats.prefilled == len(diverging) and stats.tokens == greedy(diverging, 8)
    cached = len(generator.cached)
    assert all(layer.state.position == cached for layer in ours.layers)
    extending = diverging + stats.tokens + [3, 4]
    stats = generator.generate(extending, 8)
    assert stats.reused == cached and stats.tokens == greedy(extending, 8)

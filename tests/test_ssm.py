"""The elastic Mamba2 mixer (elastiq.modeling.ssm) against transformers' Mamba2, at full and
pruned widths, prefill and recurrent decoding; and its sorting (elastiq.compressor.ssm_sort)."""

from __future__ import annotations

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from elastiq.compressor import ssm_sort
from elastiq.compressor.sort import ridge_leverage
from elastiq.modeling.ssm import SSMConfig, SSMMixer, chunk_states, mixer_widths, state_bytes

# 8 heads of P = 16 in 2 groups of N = 16 states; hidden 32 with expand 4, so that any P' with
# 8 P' a multiple of 32 (4, 8, 12) is a valid transformers config (hidden * expand = H * P').
H, P, G, N, HIDDEN = 8, 16, 2, 16, 32
SHAPE = dict(hidden_size=HIDDEN, num_heads=H, n_groups=G, conv_kernel=4, chunk_size=16, vocab_size=64,
             num_hidden_layers=2, tie_word_embeddings=False)
WIDTHS = [(16, 16), (12, 10), (4, 3)]


def hf_config(head_dim: int = P, state_size: int = N, **extra) -> Mamba2Config:
    return Mamba2Config(**SHAPE, head_dim=head_dim, state_size=state_size, expand=H * head_dim // HIDDEN, **extra)


def randomize(mixer: Mamba2Mixer) -> None:
    """Every tensor away from its initial value, and steps dt of 0.05-1 with a small skip D, so
    that the state carries a large part of the output (at transformers' init it carries little)."""
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-0.2, 0.2)
        mixer.A_log.uniform_(0, 2)
        dt = torch.empty(H).uniform_(0.05, 1.0)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        for module in (mixer.conv1d, mixer.in_proj, mixer.out_proj):
            if module.bias is not None:
                module.bias.normal_(0, 0.1)


def mixer(seed: int = 0, **extra) -> tuple[Mamba2Mixer, dict[str, torch.Tensor], SSMConfig]:
    """A random transformers mixer at full width, its tensors and their ``SSMConfig``."""
    torch.manual_seed(seed)
    config = hf_config(**extra)
    hf = Mamba2Mixer(config, 0).eval()
    randomize(hf)
    return hf, {k: v.detach() for k, v in hf.state_dict().items()}, SSMConfig.from_config(config.to_dict())


def sliced(weights: dict, p: int, n: int) -> dict:
    """The first p channels of every head and n states of every group, cut part by part in
    transformers' layout (written apart from ssm_sort, which it checks)."""
    heads = lambda t: t.unflatten(0, (H, P))[:, :p].flatten(0, 1)  # noqa: E731
    groups = lambda t: t.unflatten(0, (G, N))[:, :n].flatten(0, 1)  # noqa: E731
    out = dict(weights)
    for name in ("in_proj.weight", "in_proj.bias"):
        if name in weights:
            z, x, B, C, dt = weights[name].split([H * P, H * P, G * N, G * N, H])
            out[name] = torch.cat([heads(z), heads(x), groups(B), groups(C), dt])
    for name in ("conv1d.weight", "conv1d.bias"):
        if name in weights:
            x, B, C = weights[name].split([H * P, G * N, G * N])
            out[name] = torch.cat([heads(x), groups(B), groups(C)])
    out["norm.weight"] = heads(weights["norm.weight"])
    out["out_proj.weight"] = heads(weights["out_proj.weight"].T).T
    return out


@pytest.mark.parametrize("p, n", WIDTHS)
@pytest.mark.parametrize("extra", [{}, dict(use_bias=True, time_step_limit=(0.0, 0.5))], ids=["plain", "biased"])
@torch.no_grad()
def test_prefill_equals_transformers(p, n, extra):
    """At every width, with and without biases and a time-step limit, the chunked scan over 40
    tokens (2.5 chunks: a padded last chunk) equals transformers' torch path."""
    _, weights, config = mixer(**extra)
    pruned = sliced(weights, p, n)
    hf = Mamba2Mixer(hf_config(p, n, **extra), 0).eval()
    hf.load_state_dict(pruned, strict=True)
    h = torch.randn(2, 40, HIDDEN)
    ours = SSMMixer(pruned, config)
    assert (ours.head_dim, ours.state_size) == (p, n) and ours.state_dict().keys() == pruned.keys()
    torch.testing.assert_close(ours(h), hf(h), atol=1e-5, rtol=0)
    pruned_by_sort = ssm_sort.prune(weights, config, p, n)
    assert pruned_by_sort.keys() == pruned.keys() and all(torch.equal(pruned[k], pruned_by_sort[k]) for k in pruned)


@pytest.mark.parametrize("p, n", WIDTHS)
@torch.no_grad()
def test_decode_equals_prefill(p, n):
    """Prefill then token-by-token decoding, prefill continued from a state, and a prompt shorter
    than the conv kernel all give the whole sequence's prefill, outputs and final states."""
    _, weights, config = mixer(seed=1)
    ours = SSMMixer(sliced(weights, p, n), config)
    h = torch.randn(2, 40, HIDDEN)
    whole, final = ours.prefill(h)
    for split in (21, 2):
        y, state = ours.prefill(h[:, :split])
        steps = [ours.step(h[:, t:t + 1], state) for t in range(split, 40)]
        torch.testing.assert_close(torch.cat([y, *steps], 1), whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.ssm, final.ssm, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.conv, final.conv, atol=1e-5, rtol=0)
    y, state = ours.prefill(h[:, :21])
    rest, after = ours.prefill(h[:, 21:], state)
    assert after is state
    torch.testing.assert_close(torch.cat([y, rest], 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.ssm, final.ssm, atol=1e-5, rtol=0)


@torch.no_grad()
def test_causal_lm_at_pruned_width():
    """A 2-layer Mamba2ForCausalLM whose mixers are all cut to P' = 12, N' = 10 gives transformers'
    logits for that config, by prefill and by decoding token by token after a prefill."""
    torch.manual_seed(2)
    full = Mamba2ForCausalLM(hf_config()).eval()
    for layer in full.backbone.layers:
        randomize(layer.mixer)
    config = SSMConfig.from_config(full.config.to_dict())
    weights = full.state_dict()
    prefixes = [f"backbone.layers.{i}.mixer." for i in range(2)]
    pruned = dict(weights)
    for prefix in prefixes:
        cut = sliced({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}, 12, 10)
        pruned.update({prefix + k: v for k, v in cut.items()})
    hf = Mamba2ForCausalLM(hf_config(12, 10)).eval()
    hf.load_state_dict(pruned, strict=True)
    mixers = [SSMMixer({k.removeprefix(prefix): v for k, v in pruned.items() if k.startswith(prefix)}, config)
              for prefix in prefixes]
    ids = torch.randint(0, 64, (2, 40))

    def logits(x: torch.Tensor, states: list, decode: bool) -> torch.Tensor:
        h = hf.backbone.embeddings(x)
        for i, (layer, m) in enumerate(zip(hf.backbone.layers, mixers)):
            if decode:
                h = h + m.step(layer.norm(h), states[i])
            else:
                y, states[i] = m.prefill(layer.norm(h), states[i])
                h = h + y
        return hf.lm_head(hf.backbone.norm_f(h))

    expected = hf(ids, use_cache=False).logits
    states = [None, None]
    torch.testing.assert_close(logits(ids, [None, None], False), expected, atol=1e-5, rtol=0)
    out = [logits(ids[:, :17], states, False)] + [logits(ids[:, t:t + 1], states, True) for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(out, 1), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_state_follows_widths_not_context():
    _, weights, config = mixer()
    for p, n in WIDTHS:
        ours = SSMMixer(sliced(weights, p, n), config)
        for dtype in (torch.float32, torch.bfloat16):
            state = ours.new_state(3, dtype)
            assert state.conv.shape == (3, H * p + 2 * G * n, 4) and state.ssm.shape == (3, H, p, n)
            held = sum(t.numel() * t.element_size() for t in (state.conv, state.ssm))
            assert state_bytes(config, p, n, 3, dtype) == held == 3 * ((H * p + 2 * G * n) * 4 + H * p * n) * (
                4 if dtype == torch.float32 else 2)
        _, short = ours.prefill(torch.randn(3, 5, HIDDEN))
        _, long = ours.prefill(torch.randn(3, 60, HIDDEN))
        assert short.ssm.shape == long.ssm.shape and short.conv.shape == long.conv.shape
    assert state_bytes(config, 8, 8, 1) < state_bytes(config, P, N, 1)


@torch.no_grad()
def test_chunk_states_of_one_chunk_are_the_final_state():
    """Within one chunk from no past, what the chunk writes is the whole state at its end."""
    _, weights, config = mixer()
    ours = SSMMixer(weights, config)
    h = torch.randn(2, 13, HIDDEN)
    s = ours.scan_inputs(h)
    states = chunk_states(s.x, s.dt, ours.A, s.B, chunk_size=16)
    assert states.shape == (2, 1, H, P, N)
    torch.testing.assert_close(states[:, 0], ours.prefill(h)[1].ssm, atol=1e-6, rtol=0)


def _drop(name):
    return lambda w: {k: v for k, v in w.items() if k != name}


def _set(name, t):
    return lambda w: {**w, name: t(w[name])}


BAD = [
    (_drop("A_log"), r"missing: \['A_log'\]"),
    (lambda w: {**w, "x_proj.weight": torch.zeros(1)}, r"unexpected: \['x_proj.weight'\]"),
    (_set("in_proj.weight", lambda t: t[:-1]), r"in_proj.weight has shape \(327, 32\); expected \(328, 32\)"),
    (_set("conv1d.weight", lambda t: t[:-1]), r"conv1d.weight has shape \(191, 1, 4\)"),
    (_set("conv1d.weight", lambda t: t[..., :3]), r"conv1d.weight has shape \(192, 1, 3\)"),
    (_set("conv1d.bias", lambda t: t[:-2]), r"conv1d.bias has shape \(190,\); expected \(192,\)"),
    (_set("dt_bias", lambda t: torch.cat([t, t[:1]])), r"dt_bias has shape \(9,\); expected \(8,\)"),
    (_set("norm.weight", lambda t: t[:-8]), r"norm.weight has shape \(120,\); expected \(128,\)"),
    (_set("out_proj.weight", lambda t: t[:, :-1]), r"out_proj.weight has shape \(32, 127\)"),
    (_set("out_proj.weight", lambda t: t[:-1]), r"in_proj.weight has shape \(328, 32\); expected \(328, 31\)"),
    # one part pruned, the others not: the error names the first tensor that disagrees
    (lambda w: {**sliced(w, 12, 16), "in_proj.weight": w["in_proj.weight"]}, r"in_proj.weight has shape \(328, 32\)"),
]


@pytest.mark.parametrize("damage, message", BAD)
def test_bad_shapes_name_the_tensor(damage, message):
    _, weights, config = mixer()
    with pytest.raises(ValueError, match=message):
        SSMMixer(damage(weights), config)


def test_heads_must_fill_groups():
    _, weights, config = mixer()
    with pytest.raises(ValueError, match="n_groups=3"):
        mixer_widths(weights, SSMConfig(H, 3, 4, 1e-5, 16))


# --- sorting ---


def calibration(seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(4, 64, HIDDEN)


@torch.no_grad()
def test_scores_have_their_shapes():
    _, weights, config = mixer()
    h = calibration()
    for score in (ssm_sort.state_aware_scores(weights, config, h), ssm_sort.channel_scores(weights, config, h)):
        assert score.shape == (H, P) and score.isfinite().all()
        assert (score > 0).all() and (score < 1).all()  # ridge leverage of a full-rank correlation
    states = ssm_sort.state_scores(weights, config, h)
    assert states.shape == (G, N) and states.isfinite().all() and (states > 0).all()
    channels, states = ssm_sort.magnitude_scores(weights, config)
    assert channels.shape == (H, P) and states.shape == (G, N)
    assert channels.isfinite().all() and states.isfinite().all()


@torch.no_grad()
def test_scores_follow_their_definitions():
    """The state-aware P score from chunk states run token by token (restarted at each chunk's
    start), and the N score head by head, as the module docstring defines them."""
    _, weights, config = mixer()
    h = calibration()[:2, :40]
    ours = SSMMixer(weights, config)
    s = ours.scan_inputs(h)
    x, dt, A = s.x.double(), s.dt.double(), ours.A.double()
    B = s.B.double().repeat_interleave(H // G, 2)  # [b, T, H, N]
    corr = torch.zeros(H, P, P, dtype=torch.float64)
    for start in range(0, 40, config.chunk_size):
        state = torch.zeros(2, H, P, N, dtype=torch.float64)
        for t in range(start, min(start + config.chunk_size, 40)):
            written = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None]
            state = state * torch.exp(dt[:, t] * A)[..., None, None] + written
        corr += torch.einsum("bhpn,bhqn->hpq", state, state)
    expected = torch.stack([ridge_leverage(c) for c in corr]).float()
    torch.testing.assert_close(ssm_sort.state_aware_scores(weights, config, h), expected, rtol=1e-4, atol=1e-6)
    expected = torch.zeros(G, N, dtype=torch.float64)
    for head in range(H):
        g = head // (H // G)
        written = (dt[..., head, None] * s.B[:, :, g].double()).square().mean((0, 1)).sqrt()
        expected[g] += written * s.C[:, :, g].double().square().mean((0, 1)).sqrt()
    torch.testing.assert_close(ssm_sort.state_scores(weights, config, h), expected.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ssm_sort.METHODS)
@torch.no_grad()
def test_sorting_keeps_the_function(method):
    _, weights, config = mixer(use_bias=True)
    h = calibration()
    channel_order, state_order = ssm_sort.orders(weights, config, h, method)
    assert not torch.equal(channel_order, torch.arange(P).expand(H, -1))
    assert not torch.equal(state_order, torch.arange(N).expand(G, -1))
    sorted_weights = ssm_sort.sort_mixer(weights, config, h, method)
    torch.testing.assert_close(SSMMixer(sorted_weights, config)(h), SSMMixer(weights, config)(h), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ssm_sort.METHODS)
@torch.no_grad()
def test_sorted_prefix_beats_the_suffix(method):
    """Keeping the best half of either axis by the method's scores loses less of the mixer's
    output on the calibration data than keeping the worst half."""
    _, weights, config = mixer()
    h = calibration()
    reference = SSMMixer(weights, config)(h)
    channel_order, state_order = ssm_sort.orders(weights, config, h, method)
    best = ssm_sort.permute(weights, config, channel_order, state_order)
    worst = ssm_sort.permute(weights, config, channel_order.flip(-1), state_order.flip(-1))

    def error(w: dict, p: int, n: int) -> float:
        return ((SSMMixer(ssm_sort.prune(w, config, p, n), config)(h) - reference).norm() / reference.norm()).item()

    assert error(best, P // 2, N) < 0.9 * error(worst, P // 2, N)
    assert error(best, P, N // 2) < 0.9 * error(worst, P, N // 2)


def test_orders_are_checked():
    _, weights, config = mixer()
    states = torch.arange(N).expand(G, -1)
    with pytest.raises(ValueError, match="channel_order"):
        ssm_sort.permute(weights, config, torch.zeros(H, P, dtype=torch.long), states)
    with pytest.raises(ValueError, match="state_order"):
        ssm_sort.permute(weights, config, torch.arange(P).expand(H, -1), states[:, :-1])
    with pytest.raises(ValueError, match="cannot keep"):
        ssm_sort.prune(weights, config, P + 1, N)
    with pytest.raises(ValueError, match="unknown sorting method"):
        ssm_sort.orders(weights, config, None, "random")
    with pytest.raises(ValueError, match="needs calibration inputs"):
        ssm_sort.orders(weights, config, None, "uniql")

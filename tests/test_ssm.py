"""The elastic Mamba2 mixer (elastiq.modeling.model.SSMMixer, computing with elastiq.modeling.ssm)
against transformers' Mamba2Mixer, at full and pruned widths, prefill and recurrent decoding, its
tensors split by slot; and its sorting (elastiq.compressor.ssm_sort)."""

from __future__ import annotations

import pytest
import torch
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from elastiq.compressor import ssm_sort
from elastiq.compressor.sort import ridge_leverage
from elastiq.modeling.model import SSMMixer, mixer_widths
from elastiq.families.base import SSMConfig
from elastiq.modeling.ssm import chunk_states, state_bytes

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
        if isinstance(getattr(mixer.norm, "weight", None), torch.Tensor):  # Falcon-H1's may gate without a norm
            mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-0.2, 0.2)
        mixer.A_log.uniform_(0, 2)
        dt = torch.empty(mixer.num_heads).uniform_(0.05, 1.0)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        for module in (mixer.conv1d, mixer.in_proj, mixer.out_proj):
            if module.bias is not None:
                module.bias.normal_(0, 0.1)


IN_SLOTS = ("ssm_in_z", "ssm_in_x", "ssm_in_b", "ssm_in_c", "ssm_in_dt")  # in_proj's rows, in order
CONV_SLOTS = ("ssm_conv1d_x", "ssm_conv1d_b", "ssm_conv1d_c")  # conv1d's channels, in order


def split(fused: dict) -> dict:
    """A transformers mixer's tensors (fused ``in_proj`` and ``conv1d``) under the runtime's slot
    names, one tensor per part, P and N read off the shapes (written apart from the family's split)."""
    HP = fused["norm.weight"].shape[0]
    GN = (fused["conv1d.weight"].shape[0] - HP) // 2
    out = {}
    for param in ("weight", "bias"):
        if f"in_proj.{param}" in fused:
            out.update({f"{slot}.{param}": t for slot, t in zip(IN_SLOTS, fused[f"in_proj.{param}"].split(
                [HP, HP, GN, GN, H]))})
    for param in ("weight", "bias"):
        if f"conv1d.{param}" in fused:
            out.update({f"{slot}.{param}": t for slot, t in zip(CONV_SLOTS, fused[f"conv1d.{param}"].split(
                [HP, GN, GN]))})
    out.update({"ssm_dt": fused["dt_bias"], "ssm_a": fused["A_log"], "ssm_d": fused["D"],
                "ssm_norm.weight": fused["norm.weight"], "ssm_out.weight": fused["out_proj.weight"]})
    if "out_proj.bias" in fused:
        out["ssm_out.bias"] = fused["out_proj.bias"]
    return out


# The split tensors' axes of the head dimension P (head-major [H, P]) and of the state size N
# (group-major [G, N]).
HEAD_AXES = {**{f"{s}.{p}": 0 for s in ("ssm_in_z", "ssm_in_x", "ssm_conv1d_x") for p in ("weight", "bias")},
             "ssm_norm.weight": 0, "ssm_out.weight": 1}
GROUP_AXES = {f"{s}.{p}": 0 for s in ("ssm_in_b", "ssm_in_c", "ssm_conv1d_b", "ssm_conv1d_c")
              for p in ("weight", "bias")}


def select(weights: dict, channel: torch.Tensor, state: torch.Tensor) -> dict:
    """The split mixer keeping, in this order, channels ``channel`` [H, P'] of every head and states
    ``state`` [G, N'] of every group (what the checkpoint's layouts do to each tensor)."""
    P, N = weights["ssm_out.weight"].shape[1] // H, weights["ssm_in_b.weight"].shape[0] // G
    heads = (torch.arange(H)[:, None] * P + channel).flatten()
    groups = (torch.arange(G)[:, None] * N + state).flatten()
    return {k: t.index_select(HEAD_AXES[k], heads) if k in HEAD_AXES else
            t.index_select(0, groups) if k in GROUP_AXES else t for k, t in weights.items()}


def prefix(weights: dict, p: int, n: int) -> dict:
    """The split mixer's first p channels of every head and n states of every group."""
    return select(weights, torch.arange(p).expand(H, -1), torch.arange(n).expand(G, -1))


def mixer(seed: int = 0, **extra) -> tuple[Mamba2Mixer, dict[str, torch.Tensor], SSMConfig]:
    """A random transformers mixer at full width, its tensors (transformers' names) and their
    ``SSMConfig``."""
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
    ours = SSMMixer(split(pruned), config)
    assert (ours.head_dim, ours.state_size) == (p, n) and ours.state_dict().keys() == split(pruned).keys()
    torch.testing.assert_close(ours(h), hf(h), atol=1e-5, rtol=0)
    # a prefix of each head's channels and each group's states of the split tensors is that width
    cut = prefix(split(weights), p, n)
    assert cut.keys() == split(pruned).keys() and all(torch.equal(cut[k], t) for k, t in split(pruned).items())


@pytest.mark.parametrize("p, n", WIDTHS)
@torch.no_grad()
def test_decode_equals_prefill(p, n):
    """Prefill then token-by-token decoding, prefill continued from a state, and a prompt shorter
    than the conv kernel all give the whole sequence's prefill, outputs and final states."""
    _, weights, config = mixer(seed=1)
    ours = SSMMixer(prefix(split(weights), p, n), config)
    h = torch.randn(2, 40, HIDDEN)
    whole, final = ours.prefill(h)
    assert final.position == 40
    for first in (21, 2):
        y, state = ours.prefill(h[:, :first])
        steps = [ours.step(h[:, t:t + 1], state) for t in range(first, 40)]
        torch.testing.assert_close(torch.cat([y, *steps], 1), whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.ssm, final.ssm, atol=1e-5, rtol=0)
        torch.testing.assert_close(state.conv, final.conv, atol=1e-5, rtol=0)
    y, state = ours.prefill(h[:, :21])
    rest, after = ours.prefill(h[:, 21:], state)
    assert after is state and state.position == 40
    torch.testing.assert_close(torch.cat([y, rest], 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.ssm, final.ssm, atol=1e-5, rtol=0)


@torch.no_grad()
def test_state_follows_widths_not_context():
    _, weights, config = mixer()
    for p, n in WIDTHS:
        ours = SSMMixer(prefix(split(weights), p, n), config)
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
    ours = SSMMixer(split(weights), config)
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
    (_drop("ssm_a"), r"missing: \['ssm_a'\]"),
    (lambda w: {**w, "in_proj.weight": torch.zeros(1)}, r"unexpected: \['in_proj.weight'\]"),
    (_set("ssm_in_z.weight", lambda t: t[:-1]), r"ssm_in_z.weight has shape \(127, 32\); expected \(128, 32\)"),
    (_set("ssm_in_dt.weight", lambda t: t[:, :-1]), r"ssm_in_dt.weight has shape \(8, 31\); expected \(8, 32\)"),
    (_set("ssm_in_b.weight", lambda t: t[:-1]), r"ssm_in_b.weight has shape \(31, 32\); expected \(n_groups \* state"),
    # B cut to N = 15 and C not: C is named
    (_set("ssm_in_b.weight", lambda t: t[:-2]), r"ssm_in_c.weight has shape \(32, 32\); expected \(30, 32\)"),
    (_set("ssm_conv1d_x.weight", lambda t: t[:-1]),
     r"ssm_conv1d_x.weight has shape \(127, 1, 4\); expected \(128, 1, 4\)"),
    (_set("ssm_conv1d_b.weight", lambda t: t[..., :3]),
     r"ssm_conv1d_b.weight has shape \(32, 1, 3\); expected \(32, 1, 4\)"),
    (_set("ssm_conv1d_c.bias", lambda t: t[:-2]), r"ssm_conv1d_c.bias has shape \(30,\); expected \(32,\)"),
    (_set("ssm_dt", lambda t: torch.cat([t, t[:1]])), r"ssm_dt has shape \(9,\); expected \(8,\)"),
    (_set("ssm_norm.weight", lambda t: t[:-8]), r"ssm_norm.weight has shape \(120,\); expected \(128,\)"),
    (_set("ssm_out.weight", lambda t: t[:, :-1]), r"ssm_out.weight has shape \(32, 127\); expected \(hidden_size"),
    (_set("ssm_out.weight", lambda t: t[:-1]), r"ssm_in_z.weight has shape \(128, 32\); expected \(128, 31\)"),
    # one part pruned, the others not: the error names the first tensor that disagrees
    (lambda w: {**prefix(w, 12, 16), "ssm_in_z.weight": w["ssm_in_z.weight"]},
     r"ssm_in_z.weight has shape \(128, 32\); expected \(96, 32\)"),
]


@pytest.mark.parametrize("damage, message", BAD)
def test_bad_shapes_name_the_tensor(damage, message):
    _, weights, config = mixer()
    with pytest.raises(ValueError, match=message):
        SSMMixer(damage(split(weights)), config)


def test_heads_must_fill_groups():
    _, weights, config = mixer()
    with pytest.raises(ValueError, match="n_groups=3"):
        mixer_widths(split(weights), SSMConfig(H, 3, 4, 1e-5, 16))


# --- sorting ---


def calibration(seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(4, 64, HIDDEN)


def split_mixer(**extra) -> tuple[dict[str, torch.Tensor], SSMConfig]:
    """A random mixer's tensors by slot, as the sorting reads them, and its ``SSMConfig``."""
    _, weights, config = mixer(**extra)
    return split(weights), config


@torch.no_grad()
def test_scores_have_their_shapes():
    weights, config = split_mixer()
    h = calibration()
    for score in (ssm_sort.state_aware_scores(weights, config, h), ssm_sort.channel_scores(weights, config, h)):
        assert score.shape == (H, P) and score.isfinite().all()
        assert (score > 0).all() and (score < 1).all()  # ridge leverage of a full-rank correlation
    states = ssm_sort.state_scores(weights, config, h)
    assert states.shape == (G, N) and states.isfinite().all() and (states > 0).all()
    channels, states = ssm_sort.magnitude_scores(weights, config)
    assert channels.shape == (H, P) and states.shape == (G, N)
    assert channels.isfinite().all() and states.isfinite().all()
    # a whole block's tensors: its norm (which the calibration inputs have passed) is not read
    block = {**weights, "attn_norm.weight": torch.full((HIDDEN,), 3.0)}
    for method in ssm_sort.METHODS:
        assert all(torch.equal(a, b) for a, b in zip(ssm_sort.orders(block, config, h, method),
                                                      ssm_sort.orders(weights, config, h, method)))


@torch.no_grad()
def test_scores_follow_their_definitions():
    """The state-aware P score from chunk states run token by token (restarted at each chunk's
    start), the N score head by head, as the module docstring defines them, and the magnitude
    scores from the fused tensors."""
    _, fused, config = mixer()
    weights = split(fused)
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
    z, x, B, C, _ = fused["in_proj.weight"].double().square().sum(1).split([H * P, H * P, G * N, G * N, H])
    conv_x, conv_b, conv_c = fused["conv1d.weight"].double().square().sum((1, 2)).split([H * P, G * N, G * N])
    norm, out = fused["norm.weight"].double().square(), fused["out_proj.weight"].double().square().sum(0)
    channels = z + x + conv_x + norm + out
    magnitude = ssm_sort.magnitude_scores(weights, config)
    torch.testing.assert_close(magnitude[0], channels.sqrt().view(H, P).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(magnitude[1], (B + C + conv_b + conv_c).sqrt().view(G, N).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ssm_sort.METHODS)
@torch.no_grad()
def test_sorting_keeps_the_function(method):
    """Permuting the split tensors by the orders (as the checkpoint's layouts do) keeps the mixer's output."""
    weights, config = split_mixer(use_bias=True)
    h = calibration()
    channel_order, state_order = ssm_sort.orders(weights, config, h, method)
    assert channel_order.shape == (H, P) and state_order.shape == (G, N)
    assert torch.equal(channel_order.sort(-1).values, torch.arange(P).expand(H, -1))
    assert torch.equal(state_order.sort(-1).values, torch.arange(N).expand(G, -1))
    assert not torch.equal(channel_order, torch.arange(P).expand(H, -1))
    assert not torch.equal(state_order, torch.arange(N).expand(G, -1))
    sorted_weights = select(weights, channel_order, state_order)
    torch.testing.assert_close(SSMMixer(sorted_weights, config)(h), SSMMixer(weights, config)(h), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ssm_sort.METHODS)
@torch.no_grad()
def test_sorted_prefix_beats_the_suffix(method):
    """Keeping the best half of either axis by the method's scores loses less of the mixer's
    output on the calibration data than keeping the worst half."""
    weights, config = split_mixer()
    h = calibration()
    reference = SSMMixer(weights, config)(h)
    channel_order, state_order = ssm_sort.orders(weights, config, h, method)
    best = select(weights, channel_order, state_order)
    worst = select(weights, channel_order.flip(-1), state_order.flip(-1))

    def error(w: dict, p: int, n: int) -> float:
        return ((SSMMixer(prefix(w, p, n), config)(h) - reference).norm() / reference.norm()).item()

    assert error(best, P // 2, N) < 0.9 * error(worst, P // 2, N)
    assert error(best, P, N // 2) < 0.9 * error(worst, P, N // 2)


def test_orders_are_checked():
    weights, config = split_mixer()
    with pytest.raises(ValueError, match="unknown sorting method"):
        ssm_sort.orders(weights, config, None, "random")
    with pytest.raises(ValueError, match="needs calibration inputs"):
        ssm_sort.orders(weights, config, None, "uniql")

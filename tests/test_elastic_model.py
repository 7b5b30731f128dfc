"""The elastic model: equal to transformers, blind to sorting, pruned by slicing exactly as by
zeroing, loading any rate of a nested checkpoint directly; and its RoPE gather on its own."""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half

from elastiq.checkpoint import MLP, QK, VO, Checkpoint, RateSpec, write_checkpoint
from elastiq.kernels.rope import pair_channels, position_tables, rotate_gathered_
from elastiq.modeling.model import Transformer
from conftest import build_tiny, model_groups

H, G, D = 4, 2, 64  # tiny_config's query heads, KV heads and head size
Q, P = H // G, D // 2
FULL = ({MLP: 96, QK: P, VO: D},) * 2
SMALL = ({MLP: 32, QK: 20, VO: 32}, {MLP: 64, QK: 28, VO: 64})  # kept units of layers 0 and 1

# The tensors with a prunable axis, by name within a block, and how their units lie.
ROLES = {"mlp.gate_proj.weight": "rows", "mlp.up_proj.weight": "rows", "mlp.down_proj.weight": "cols",
         "self_attn.q_proj.weight": "q", "self_attn.q_proj.bias": "q", "self_attn.k_proj.weight": "k",
         "self_attn.k_proj.bias": "k", "self_attn.v_proj.weight": "v", "self_attn.v_proj.bias": "v",
         "self_attn.o_proj.weight": "o"}
KINDS = {"rows": MLP, "cols": MLP, "q": QK, "k": QK, "v": VO, "o": VO}
# q, k, v outputs as [G, heads of the group, halves, units]: a rotary pair is one unit in both halves.
SPLIT = {"q": (G, Q, 2, -1), "k": (G, 1, 2, -1), "v": (G, 1, 1, -1)}


def _units(name: str) -> tuple[int, str] | None:
    """(layer, role) of a tensor with a prunable axis, else None."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return (int(m[1]), ROLES[m[2]]) if m and m[2] in ROLES else None


def take(t: torch.Tensor, role: str, idx: torch.Tensor) -> torch.Tensor:
    """Units ``idx`` of ``t`` in that order: MLP channels [n], or per KV group [G, n] (rotary pairs
    of a KV head and all its query heads, both halves; V rank of v rows and of o's query heads)."""
    if role == "rows":
        return t[idx]
    if role == "cols":
        return t[:, idx]
    if role == "o":
        o = t.unflatten(1, (G, Q, -1))
        return torch.stack([o[:, g][..., idx[g]] for g in range(G)], dim=1).flatten(1)
    x = t.unflatten(0, SPLIT[role])
    return torch.stack([x[g][:, :, idx[g]] for g in range(G)]).flatten(0, 3)


def zero_from(t: torch.Tensor, role: str, n: int) -> torch.Tensor:
    """``t`` with its units from ``n`` on zeroed where they are produced (gate/up, q/k, v rows):
    down and o columns then only ever meet zeros, so they stay."""
    if role in ("cols", "o"):
        return t
    t = t.clone()
    (t if role == "rows" else t.unflatten(0, SPLIT[role]).movedim(3, 0))[n:] = 0
    return t


def remap(state: dict, index) -> dict:
    """``state`` with every prunable tensor reduced to ``take(t, role, index(layer, kind))``."""
    out = dict(state)
    for name, t in state.items():
        if (u := _units(name)) is not None:
            out[name] = take(t, u[1], index(u[0], KINDS[u[1]]))
    return out


def sort(state: dict, seed: int = 0) -> tuple[dict, dict]:
    """A random 'sorting': permuted MLP channels, rotary pairs and V ranks (per KV group), with the
    pair permutation stored as rope_pairs; returns the sorted state and the permutations."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for i in range(2):
        perms[i, MLP] = torch.randperm(FULL[i][MLP], generator=gen)
        perms[i, QK] = torch.stack([torch.randperm(P, generator=gen) for _ in range(G)])
        perms[i, VO] = torch.stack([torch.randperm(D, generator=gen) for _ in range(G)])
    out = remap(state, lambda i, kind: perms[i, kind])
    for i in range(2):
        out[f"model.layers.{i}.self_attn.rope_pairs"] = perms[i, QK].to(torch.int32)
    return out, perms


def unsort(state: dict, perms: dict) -> dict:
    """The Hugging Face state (original order, no rope_pairs) of a full-width sorted state."""
    out = remap(state, lambda i, kind: perms[i, kind].argsort(dim=-1))
    return {k: v for k, v in out.items() if not k.endswith("rope_pairs")}


def sliced(state: dict, widths) -> dict:
    """Keep the first ``widths[layer][kind]`` units of every prunable axis, rope_pairs included."""
    def first(i: int, kind: str) -> torch.Tensor:
        n = torch.arange(widths[i][kind])
        return n if kind == MLP else n.expand(G, -1)

    out = remap(state, first)
    for i in range(2):
        name = f"model.layers.{i}.self_attn.rope_pairs"
        out[name] = state[name][:, :widths[i][QK]]
    return out


def masked(state: dict, widths) -> dict:
    """The full-width state with the units beyond ``widths`` zeroed."""
    out = dict(state)
    for name, t in state.items():
        if (u := _units(name)) is not None:
            out[name] = zero_from(t, u[1], widths[u[0]][KINDS[u[1]]])
    return out


def hf_logits(model, state: dict, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of ``model`` with its weights replaced by ``state``."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone(ids).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < tol, f"max abs diff {diff:.2e}"


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def model(request, tokenizer):
    """A tiny model of each family; Qwen2's q/k/v biases made non-zero (a fresh model has zeros)."""
    m = build_tiny(request.param, tokenizer, seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return m


@pytest.fixture(scope="module")
def ids(tokenizer, data_dir) -> torch.Tensor:
    """Two rows of 48 WikiText-2 tokens."""
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    return torch.tensor(tokenizer.encode(text)[:96]).view(2, 48)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matrices are tiny: one thread runs them fastest, and several only spin when the
    machine's cores are busy (4x slower here under a background job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


def test_equals_transformers(model, ids):
    elastic = Transformer.from_hf(model)
    assert_close(elastic(ids), model(ids).logits)
    assert elastic.lm_head.weight is elastic.embed_tokens.weight  # tied: one parameter
    assert sum(p.numel() for p in elastic.parameters()) == sum(p.numel() for p in model.parameters())


def test_sorting_changes_nothing(model, ids):
    state, _ = sort(model.state_dict())
    name = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(state[name], model.state_dict()[name])
    assert_close(Transformer.from_weights(state, model.config.to_dict())(ids), model(ids).logits)


def test_pruning_by_slicing_equals_zeroing(model, ids):
    state, perms = sort(model.state_dict())
    config = model.config.to_dict()
    elastic = Transformer.from_weights(sliced(state, SMALL), config)
    assert [(a.intermediate_size, a.rope_pairs, a.v_rank) for a in elastic.args.layers] == [(32, 20, 32), (64, 28, 64)]
    logits = elastic(ids)
    zeroed = masked(state, SMALL)
    assert_close(logits, Transformer.from_weights(zeroed, config)(ids))
    assert_close(logits, hf_logits(model, unsort(zeroed, perms), ids))
    assert (logits - model(ids).logits).abs().max() > 0.1  # the pruning did remove something


def test_every_checkpoint_rate_loads_directly(model, ids, tmp_path):
    groups, heads = model_groups(model)
    rates = [RateSpec(rate, {g.name: widths[g.layer][g.kind] for g in groups})
             for rate, widths in ((0.0, FULL), (0.3, SMALL))]
    state, perms = sort(model.state_dict())
    path = write_checkpoint(tmp_path / "tiny.elastiq", state, groups, rates, heads,
                            {"model_type": model.config.model_type, "config": model.config.to_dict()})
    ckpt = Checkpoint(path)
    config = ckpt.config
    for rate, widths in ((0.0, FULL), (0.3, SMALL)):
        elastic = Transformer.from_weights(ckpt.read_rate(rate), config)
        assert elastic.lm_head.weight is elastic.embed_tokens.weight
        assert_close(elastic(ids), hf_logits(model, unsort(masked(state, widths), perms), ids))


def test_right_padding_leaves_real_positions_unchanged(model, ids, tokenizer):
    elastic = Transformer.from_hf(model)
    short = ids[1, :30]
    padded = torch.stack([ids[0], torch.cat([short, torch.full((18,), tokenizer.pad_token_id)])])
    logits = elastic(padded)
    assert_close(logits[1, :30], elastic(short[None])[0], 1e-5)
    assert_close(logits[0], elastic(ids[:1])[0], 1e-5)


def test_sliding_window_attention_equals_transformers(tokenizer, ids):
    """Mistral with a window of 8 positions on every layer: the full pass, and decoding through the
    KV cache one token at a time far beyond the window, give transformers' logits."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("mistral", len(tokenizer))
    config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    elastic = Transformer.from_hf(model)
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(elastic(ids), expected)
        elastic.setup_caches(ids.shape[0], ids.shape[1])
        elastic(ids[:, :5], start=0)
        steps = [elastic(ids[:, t:t + 1], start=t) for t in range(5, ids.shape[1])]
    assert_close(torch.cat(steps, 1), expected[:, 5:])
    windowless = Transformer.from_weights(model.state_dict(), {**config.to_dict(), "sliding_window": None})
    assert (windowless(ids) - expected).abs().max() > 1e-3  # the window matters on this text


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 64}])
def test_rope_gather(rope):
    """One table per forward pass, each block gathering its kept pairs' columns, rotates exactly as
    transformers does: whole heads equal apply_rotary_pos_emb, pruned ones use their pairs' frequencies."""
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=D,
                                          max_position_embeddings=256, rope_parameters=rope))
    positions = torch.arange(100)
    cos_ref, sin_ref = hf(torch.zeros(1), positions[None])  # [1, T, d]
    cos, sin = position_tables(positions, hf.inv_freq, hf.attention_scaling)
    assert torch.equal(cos, cos_ref[0, :, :P]) and torch.equal(sin, sin_ref[0, :, :P])

    q, k = torch.randn(3, 100, H, D), torch.randn(3, 100, G, D)  # the model's [B, T, heads, 2u]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_ref, sin_ref)
    rotate_gathered_(q, k, cos, sin, pair_channels(torch.arange(P).expand(G, -1)))
    assert torch.equal(q, q_ref.transpose(1, 2)) and torch.equal(k, k_ref.transpose(1, 2))

    # Gathered: kept pair i of group g takes the columns of original pair pairs[g, i] in both halves.
    pairs = torch.stack([torch.randperm(P)[:5] for _ in range(G)])
    q, k = torch.randn(3, 100, H, 10), torch.randn(3, 100, G, 10)
    expected = []
    for x, per_group in ((q, Q), (k, 1)):
        columns = torch.cat((pairs, pairs + P), 1).repeat_interleave(per_group, 0)  # [heads, 10]
        expected.append(x * cos_ref[0][:, columns] + rotate_half(x) * sin_ref[0][:, columns])
    rotate_gathered_(q, k, cos, sin, pair_channels(pairs))
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_rope_path_gives_the_torch_paths_logits(model, ids, monkeypatch):
    """The blocks rotate through the RoPE path ``kernels.rope_for`` picks: the Triton kernel (here
    under its CPU interpreter, conftest) and elastiq's CPU op give the torch path's logits, in a
    full pass and decoding."""
    def run(elastic: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
        elastic.setup_caches(ids.shape[0], ids.shape[1])
        with torch.no_grad():
            elastic(ids[:, :5], start=0)
            steps = torch.cat([elastic(ids[:, t:t + 1], start=t) for t in range(5, 12)], 1)
            return elastic(ids), steps

    from elastiq.kernels.rope import CpuRope, TorchRope

    cpu_op = Transformer.from_hf(model)
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    torch_path = Transformer.from_hf(model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before the kernel's module is first imported
    from elastiq.kernels.rope_triton import TritonRope

    triton_path = Transformer.from_hf(model)
    assert isinstance(torch_path.layers[0].rope, TorchRope) and isinstance(triton_path.layers[0].rope, TritonRope)
    assert isinstance(cpu_op.layers[0].rope, CpuRope)
    expected = run(torch_path)
    for got, want in zip(run(triton_path), expected):
        assert_close(got, want, 1e-4)
    for got, want in zip(run(cpu_op), expected):
        assert_close(got, want, 1e-4)

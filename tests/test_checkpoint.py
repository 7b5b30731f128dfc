"""The nested checkpoint: prefix layouts, reading exactly one rate's bytes, and every failure mode."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import model_groups, with_pairs
from elastiq.checkpoint import QK, VO, Checkpoint, CheckpointError, Heads, RateSpec, write_checkpoint
from elastiq.layouts import from_storage, to_storage

HEADS = Heads(num_heads=4, num_kv_heads=2, head_dim=64)


def hf_slice(t: torch.Tensor, role: str, u: int, heads: Heads = HEADS) -> torch.Tensor:
    """Keep the first ``u`` units of ``t`` by direct indexing of the Hugging Face layout."""
    H, G, d = heads.num_heads, heads.num_kv_heads, heads.head_dim
    rest = t.shape[1:]
    if role == "rows":
        return t[:u]
    if role == "cols":
        return t[:, :u]
    if role == "q":  # channels [0, u) and [d/2, d/2 + u) of every query head
        return t.reshape(H, 2, d // 2, *rest)[:, :, :u].reshape(H * 2 * u, *rest)
    if role == "k":
        return t.reshape(G, 2, d // 2, *rest)[:, :, :u].reshape(G * 2 * u, *rest)
    if role == "v":
        return t.reshape(G, d, *rest)[:, :u].reshape(G * u, *rest)
    if role == "o":
        return t.reshape(t.shape[0], H, d)[:, :, :u].reshape(t.shape[0], H * u)
    if role == "pairs":  # [G, d/2] rotary pair indices: each KV head's first u
        return t[:, :u]
    raise AssertionError(role)


@pytest.mark.parametrize("role,shape,units", [("rows", (96, 64), 32), ("cols", (64, 96), 64), ("q", (256, 64), 5),
                                              ("q", (256,), 7), ("k", (128, 64), 3), ("k", (128,), 32),
                                              ("v", (128, 64), 32), ("v", (128,), 32), ("o", (64, 256), 32)])
def test_storage_prefix_is_the_hf_slice(role, shape, units):
    t = torch.randn(shape)
    s = to_storage(t, role, HEADS)
    assert torch.equal(from_storage(s, role, HEADS), t)  # lossless round trip
    assert torch.equal(from_storage(s[:units], role, HEADS), hf_slice(t, role, units))


QUALITY = {"heldout_ppl": 12.5, "kl_mean": 0.25, "kl_p99": 2.0, "top1_agreement": 0.75, "tokens": 96}
SMALL = {"mlp": (32, 64), QK: (20, 28), VO: (32, 64)}  # kept widths of layers 0 and 1 at rate 0.3


def _rates(model) -> list[RateSpec]:
    groups, _ = model_groups(model)
    return [RateSpec(0.0, {g.name: g.width for g in groups}),
            RateSpec(0.3, {g.name: SMALL[g.kind][g.layer] for g in groups}, QUALITY)]


def _write(tmp_path, model, tokenizer, **kwargs):
    groups, heads = model_groups(model)
    path = write_checkpoint(tmp_path / "tiny.elastiq", with_pairs(model), groups, _rates(model), heads,
                            {"model_type": model.config.model_type, "config": model.config.to_dict()},
                            tokenizer, **kwargs)
    return path, groups


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_read_rate_is_the_sliced_model_and_reads_only_its_bytes(family, tiny_dirs, tmp_path, tokenizer):
    from elastiq.compressor.intake import load_model

    model = load_model(tiny_dirs[family]).model
    path, groups = _write(tmp_path, model, tokenizer)
    ckpt = Checkpoint(path)
    assert ckpt.rates == [0.0, 0.3]
    state = with_pairs(model)
    for rate in ckpt.rates:
        ckpt.bytes_read = 0
        weights = ckpt.read_rate(rate)
        entry = ckpt.rate_entry(rate)
        assert ckpt.bytes_read == entry["weight_bytes"]
        for g in groups:
            for name, role in g.members:
                assert torch.equal(weights[name], hf_slice(state[name], role, entry["widths"][g.name])), name
        unpruned = set(state) - {n for g in groups for n, _ in g.members}
        assert all(torch.equal(weights[n], state[n]) for n in unpruned)
    assert ckpt.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied: stored once
    assert ckpt.rate_entry(0.3)["weight_bytes"] < ckpt.rate_entry(0.0)["weight_bytes"]
    assert ckpt.rate_entry(0.3)["quality"] == QUALITY
    assert ckpt.tokenizer().encode("Robert Boulter") == tokenizer.encode("Robert Boulter")


def test_kv_bytes_per_token(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    ckpt = Checkpoint(path)
    # full width: 2 layers x 2 KV heads x (64 K + 64 V channels) x 2 bytes (bf16)
    assert ckpt.rate_entry(0.0)["kv_bytes_per_token"] == 2 * 2 * (64 + 64) * 2
    w = ckpt.rate_entry(0.3)["widths"]
    expected = sum(2 * (2 * w[f"layers.{i}.qk"] + w[f"layers.{i}.vo"]) for i in range(2)) * 2
    assert ckpt.rate_entry(0.3)["kv_bytes_per_token"] == expected


def _flip_byte(path, tensor: str, unit: int, ckpt: Checkpoint) -> None:
    entry = ckpt.tensors[tensor]
    unit_bytes = torch.tensor(entry["storage_shape"][1:]).prod().item() * 4
    offset = ckpt._offsets[tensor][0] + unit * unit_bytes
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[offset] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))


def test_corruption_in_a_pruned_tail_is_found_only_when_read(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    name = "model.layers.0.mlp.down_proj.weight"  # rate 0.3 keeps 32 of its 96 units
    _flip_byte(path, name, 80, Checkpoint(path))
    Checkpoint(path).read_rate(0.3)  # the damaged bytes are never read
    with pytest.raises(CheckpointError, match=rf"tensor {name}: units \[32, 96\) fail their sha256 check"):
        Checkpoint(path).read_rate(0.0)
    assert Checkpoint(path).read_rate(0.0, verify=False)[name].shape == (64, 96)


def test_truncated_weights(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"weights.safetensors is truncated: tensor .* ends at byte"):
        Checkpoint(path)


def _as_version_1(manifest: dict) -> dict:
    """``manifest`` as elastiq wrote it in format version 1: each tensor named a role, not a layout
    (the role a layout belongs to is found by trying every role on the entry's shape)."""
    from elastiq.layouts import role_layout

    heads = Heads(**manifest["heads"])
    for entry in manifest["tensors"].values():
        layout = entry.pop("layout")
        found = [r for r in ("rows", "cols", "q", "k", "v", "o", "pairs")
                 if layout and role_layout(r, heads.num_heads, heads.num_kv_heads, len(entry["shape"])).to_dict() == layout]
        role = found[0] if layout else "whole"
        blocks = entry.get("unit_channels", 1) > 1
        entry["role"] = {"cols": "cols_blocks", "o": "o_blocks"}[role] if blocks else role
    manifest["format_version"] = 1
    del manifest["manifest_sha256"], manifest["files"]  # version 3's
    return manifest


@pytest.mark.parametrize("quantized", [False, True])
def test_a_version_1_checkpoint_reads_as_it_did(quantized, tiny_llama, tmp_path, tokenizer):
    """Checkpoints made before layouts were data (a user's cache) read through a migration."""
    tensors = with_pairs(tiny_llama, _quantized(tiny_llama) if quantized else None)
    groups, heads = model_groups(tiny_llama)
    path = write_checkpoint(tmp_path / "v2.elastiq", tensors, groups, _rates(tiny_llama), heads, {}, tokenizer)
    v2 = Checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    old = _as_version_1(json.loads(json.dumps(manifest)))
    assert all("layout" not in e for e in old["tensors"].values())
    (path / "manifest.json").write_text(json.dumps(old))
    v1 = Checkpoint(path)
    assert v1.manifest["format_version"] == 1
    assert {n: e["layout"] for n, e in v1.tensors.items()} == {n: e["layout"] for n, e in manifest["tensors"].items()}
    for rate in v1.rates:
        a, b = v1.read_rate(rate), v2.read_rate(rate)
        for name in a:
            x, y = a[name], b[name]
            assert torch.equal(*(t.codes for t in (x, y))) if hasattr(x, "codes") else torch.equal(x, y), name
    _check_unit_order(v1, v2)


def _check_unit_order(ckpt: Checkpoint, reference: Checkpoint) -> None:
    """A pruned tensor read in unit order is the tensor gathered by ``unit_order``, its rate 0.3
    part a prefix of its rate 0 part, and the rest is what ``read_span`` reads."""
    dense = lambda t: t.dequantize() if hasattr(t, "codes") else t  # noqa: E731
    held, full = dict(ckpt.iter_rate(0.3, unit_order=True)), dict(reference.iter_rate(0.0, unit_order=True))
    natural = reference.read_rate(0.0)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        axis = ckpt.unit_axis(name)
        order = reference.unit_order(name, 0.0)
        if name.endswith(("q_proj.weight", "o_proj.weight", "v_proj.weight")):
            assert order is not None and not torch.equal(order, torch.sort(order).values), name
        if order is not None:
            assert torch.equal(dense(natural[name]).index_select(axis, order), dense(full[name])), name
        kept, width = dense(held[name]).shape[axis], dense(full[name]).shape[axis]
        rest = dense(ckpt.read_span(name, kept, width))
        assert torch.equal(torch.cat((dense(held[name]), rest), axis), dense(full[name])), name


def test_unknown_format_version(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"format version 99; this elastiq reads versions 1, 2 and 3: rebuild it "
                                               r"with `elastiq compress`"):
        Checkpoint(path)


def test_rate_not_offered(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    with pytest.raises(CheckpointError, match=r"rate 0.25 is not offered by tiny.elastiq; offered: 0.0, 0.3"):
        Checkpoint(path).read_rate(0.25)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a nested checkpoint"):
        Checkpoint(tmp_path)


def test_existing_output_is_refused_unless_overwrite(tiny_llama, tmp_path, tokenizer):
    path, _ = _write(tmp_path, tiny_llama, tokenizer)
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        _write(tmp_path, tiny_llama, tokenizer)
    _write(tmp_path, tiny_llama, tokenizer, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.elastiq"]


def test_interrupted_write_leaves_nothing(tiny_llama, tmp_path, tokenizer, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, tiny_llama, tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_widths_off_the_granularity_are_refused(tiny_llama, tmp_path, tokenizer):
    groups, heads = model_groups(tiny_llama)
    widths = {g.name: g.width for g in groups} | {"layers.1.mlp": 40}
    with pytest.raises(CheckpointError, match=r"group layers.1.mlp needs a kept width of 96 or a multiple of 32"):
        write_checkpoint(tmp_path / "x.elastiq", with_pairs(tiny_llama), groups, [RateSpec(0.1, widths)],
                         heads, {}, tokenizer)


# --- quantized checkpoints ------------------------------------------------------------------------

def _quantized(model) -> dict:
    from elastiq.quants import QuantizedTensor, quantize_rtn

    out = {}
    for name, t in model.state_dict().items():
        out[name] = QuantizedTensor(*quantize_rtn(t)) if t.dim() == 2 else t
    out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied: the same object
    return out


@pytest.mark.parametrize("role,shape,blocks", [("cols", (64, 3, 16), 2), ("o", (64, 8, 16), 1), ("o", (64, 8), 1)])
def test_block_storage_prefix_is_whole_input_blocks(role, shape, blocks):
    """A quantized matrix's codes [out, in/32, 16] and scales [out, in/32] take its layout: the
    units of an input axis are then whole blocks."""
    t = torch.randint(0, 255, shape, dtype=torch.uint8)
    s = to_storage(t, role, HEADS)
    assert torch.equal(from_storage(s, role, HEADS), t)
    if role == "cols":
        expected = t[:, :blocks]
    else:  # o_proj's input is 4 query heads x 2 rank blocks: keep each head's first rank blocks
        expected = t.reshape(64, 4, 2, *shape[2:])[:, :, :blocks].reshape(64, 4 * blocks, *shape[2:])
    assert torch.equal(from_storage(s[:blocks], role, HEADS), expected)


def test_quantized_rates_slice_whole_blocks_and_read_only_their_bytes(tiny_llama, tmp_path, tokenizer):
    from elastiq.quants import QuantizedTensor

    groups, heads = model_groups(tiny_llama)
    tensors = with_pairs(tiny_llama, _quantized(tiny_llama))
    path = write_checkpoint(tmp_path / "q.elastiq", tensors, groups, _rates(tiny_llama), heads, {}, tokenizer,
                            quantization={"format": "q4_0", "block": 32})
    ckpt = Checkpoint(path)
    assert ckpt.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    full = ckpt.read_rate(0.0)
    for rate in ckpt.rates:
        ckpt.bytes_read = 0
        weights = ckpt.read_rate(rate)
        assert ckpt.bytes_read == ckpt.rate_entry(rate)["weight_bytes"]
        widths = ckpt.rate_entry(rate)["widths"]
        for g in groups:
            for name, role in g.members:
                q = weights[name]
                if not isinstance(q, QuantizedTensor):
                    continue
                # in channels, the sliced matrix is the full one cut like a float one
                assert torch.equal(q.dequantize(), hf_slice(tensors[name].dequantize(), role, widths[g.name])), name
        name = "model.layers.0.mlp.down_proj.weight.q4_codes"  # the bytes of a sliced tensor are a prefix
        kept = ckpt.read_units(name, 0, widths["layers.0.mlp"] // 32)
        assert torch.equal(kept, ckpt.read_units(name, 0, 3)[:widths["layers.0.mlp"] // 32])
    assert torch.equal(full["lm_head.weight"].codes, tensors["model.embed_tokens.weight"].codes)
    state = {n: t for n, t in with_pairs(tiny_llama).items() if n != "lm_head.weight"}  # tied: stored once
    exact = sum(t.numel() // 32 * 18 if t.dim() == 2 and t.is_floating_point() else t.numel() * 4
                for t in state.values())
    assert ckpt.rate_entry(0.0)["weight_bytes"] == exact  # Q4_0: 18 bytes per 32 weights; norms, pairs 4 bytes

"""Checks every hybrid family's tests run on its tiny checkpoint (Nemotron-H, Bamba, Falcon-H1):
each rate is its slice, an engine switched in place is a fresh one, the planner counts what the
engine holds, and recovery's masks compute every slice."""

from __future__ import annotations

import torch

from elastiq.checkpoint import Checkpoint


def sliced(weights: dict, ckpt: Checkpoint, rate: float) -> dict:
    """The full sorted model of ``ckpt`` cut to ``rate``'s widths by slicing each member tensor in
    its own layout (written apart from the checkpoint's reader): rows/n and cols/n per SSM head or
    group, rows and cols of an MLP, v per KV head, o per query head, and q, k (each head's two
    halves of rotary pairs) and the pair indices per KV head."""
    widths, heads = ckpt.rate_entry(rate)["widths"], ckpt.heads
    parts_of = {"rows": (1, 0), "cols": (1, 1), "v": (heads.num_kv_heads, 0), "o": (heads.num_heads, 1)}
    halves = {"q": heads.num_heads * 2, "k": heads.num_kv_heads * 2} if heads else {}
    out = dict(weights)
    for g in ckpt.groups:
        for name, role in g.members:
            if role == "pairs":
                out[name] = weights[name][:, :widths[g.name]]
                continue
            if role in halves:
                cut = weights[name].unflatten(0, (halves[role], -1)).narrow(1, 0, widths[g.name])
                out[name] = cut.flatten(0, 1)
                continue
            kind, _, n = role.partition("/")
            parts, axis = (int(n), 1 if kind == "cols" else 0) if n else parts_of[role]
            shaped = weights[name].unflatten(axis, (parts, -1))
            out[name] = shaped.narrow(axis + 1, 0, widths[g.name]).flatten(axis, axis + 1)
    return out


@torch.no_grad()
def every_rate_is_its_slice(ckpt: Checkpoint, source_logits: torch.Tensor, ids: torch.Tensor) -> None:
    """Rate 0 computes the source model's logits; every other rate's tensors, read, compute what
    the full model's slices do, and differ from the source."""
    from elastiq.modeling.model import Transformer

    full = ckpt.read_rate(0.0)
    got = Transformer.from_weights(full, ckpt.config)(ids)
    want = source_logits
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0), (got - want).abs().max()
    for rate in ckpt.rates[1:]:
        read = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        cut = Transformer.from_weights(sliced(full, ckpt, rate), ckpt.config)(ids)
        assert torch.equal(read, cut), rate
        assert not torch.allclose(read, want, atol=1e-2), rate


@torch.no_grad()
def switches_as_fresh_loads(ckpt: Checkpoint, ids: torch.Tensor, float32: bool) -> None:
    """An engine switched in place (0 -> largest rate -> the others -> 0) computes what a fresh one
    does, bit for bit; in float32, what the model of the rate's tensors does (unit order sums the
    output projections' inputs in another order: float rounding)."""
    from elastiq.modeling.model import Transformer
    from elastiq.runtime.engine import Engine

    switched = Engine(ckpt, 0.0, ctx=64, dtype=torch.float32 if float32 else None)
    for rate in (0.0, *reversed(ckpt.rates[1:]), 0.0):
        switched.set_rate(rate)
        got = switched.logits(ids)
        assert torch.equal(got, Engine(ckpt, rate, ctx=64, dtype=switched.dtype).logits(ids)), rate
        if float32:
            want = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), rate


def planner_counts_what_the_engine_holds(ckpt: Checkpoint) -> None:
    """At every rate the torch footprint's weights and cache (KV caches and recurrent states) are
    what the engine holds, to the byte, and only the KV part grows with the context."""
    from elastiq.modeling.ssm import SSMState
    from elastiq.runtime.engine import Engine
    from elastiq.runtime.memory import predict_footprint

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


@torch.no_grad()
def masks_compute_every_slice(ckpt: Checkpoint, family, ids: torch.Tensor) -> set[str]:
    """With LoRA in every projection (random B, so that it counts), the masked full model computes
    each rate's slice of the merged weights, and unmasked it is the full model. Returns the
    projections LoRA wraps (runtime names)."""
    from elastiq.compressor.recover import UnitMasks, lora_model, merged_weights, width_units
    from elastiq.modeling.model import Transformer

    weights = ckpt.read_rate(0.0)
    model = lora_model(weights, ckpt.config, rank=4, alpha=8.0, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
    merged = merged_weights(model, weights, family)
    full = model(ids)
    assert (full - Transformer.from_weights(weights, ckpt.config)(ids)).abs().max() > 1e-2  # LoRA counts
    masks = UnitMasks(model, ckpt.groups, ckpt.heads)
    for rate in ckpt.rates:
        masks.set(width_units(ckpt.groups, ckpt.heads, ckpt.rate_entry(rate)["widths"]))
        expected = Transformer.from_weights(sliced(merged, ckpt, rate), ckpt.config)(ids)
        assert (model(ids) - expected).abs().max() < 1e-4 * expected.abs().max(), rate
    masks.set(None)
    assert torch.equal(model(ids), full)
    masks.remove()
    return {name.partition(".lora_B")[0] for name, _ in model.named_parameters() if "lora_B" in name}


def llama_cpp_plans(ckpt: Checkpoint, rate: float, ctx: int, kv: int, states: int, folder) -> None:
    """llama.cpp's footprint of ``rate`` holds ``kv`` bytes of KV cache and ``states`` of recurrent
    state before and after the export (its weights within 2% of the file), llama.cpp's own account
    of its memory agrees, and the engine goes on from its state only (a mixer cannot go back)."""
    import re
    import subprocess
    import sys

    import pytest

    from elastiq.runtime.backends import backend, open_engine

    llama = backend("llama.cpp")
    before = llama.footprint(ckpt, rate, ctx, baseline=0)
    engine = open_engine("llama.cpp", ckpt.path, rate, ctx=ctx)
    after = llama.footprint(ckpt, rate, ctx, baseline=0)
    assert before.kv_cache == after.kv_cache == kv + states
    assert abs(before.weights - after.weights) <= 0.02 * after.weights and after.weights >= engine.load_bytes
    code = (f"import llama_cpp; llama_cpp.Llama({str(engine.export)!r}, n_ctx={ctx}, n_threads=1, n_batch={ctx}, "
            "verbose=True)")
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder).stderr
    said = dict(re.findall(r"(llama_kv_cache|llama_memory_recurrent): size = +([\d.]+) MiB", log))
    assert float(said["llama_kv_cache"]) == pytest.approx(kv / 2**20, abs=0.006), log
    assert float(said["llama_memory_recurrent"]) == pytest.approx(states / 2**20, abs=0.006), log
    g = engine.generator
    assert g.recurrent
    first = g.generate([5, 6, 7, 8, 9], 4)
    assert g.generate([5, 6, 7, 8, 9] + first.tokens, 2).reused == 5 + 3  # the state stands after the three tokens
    assert g.generate([5, 6, 7, 8, 9], 4).reused == 0  # going back starts over

"""Mamba2 through the pipeline: the family description, its split mixers, state-aware sorting into a
nested checkpoint, and that checkpoint at every rate (tiny random models, built offline)."""

from __future__ import annotations

import pytest
import torch

from test_ssm import randomize

from elastiq import ElastiqError
from elastiq.checkpoint import SSM_N, SSM_P, Checkpoint
from elastiq.families import family_for
from elastiq.families.mamba2 import MAMBA2, split_mixers
from elastiq.layouts import from_storage, to_storage

# 4 SSM heads of P = 64 (two Q4_0 blocks: P can be halved), 2 groups of N = 64 states, hidden 128.
H, P, G, N, HIDDEN = 4, 64, 2, 64, 128


def mamba2_config(vocab_size: int, **extra):
    from transformers import Mamba2Config

    return Mamba2Config(hidden_size=HIDDEN, num_heads=H, head_dim=P, n_groups=G, state_size=N, expand=H * P // HIDDEN,
                        conv_kernel=4, chunk_size=16, vocab_size=vocab_size, num_hidden_layers=2,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def build_mamba2(vocab_size: int, seed: int = 0, **extra):
    """A random Mamba2 whose state carries much of each mixer's output: steps dt of 0.05-1, decays
    A of -1 to -7, a small skip D, gated-norm weights around 1 (transformers' initialisation leaves
    the state little to do)."""
    from transformers import Mamba2ForCausalLM

    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(mamba2_config(vocab_size, **extra)).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            randomize(block.mixer)
        model.lm_head.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def mamba2_folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba2")
    build_mamba2(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mamba2_checkpoint(mamba2_folder, data_dir, tmp_path_factory) -> Checkpoint:
    from elastiq.compressor.compress import CompressOptions, compress

    out = tmp_path_factory.mktemp("mamba2-ckpt") / "m.elastiq"
    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=40, quality_windows=2)
    return Checkpoint(compress(mamba2_folder, out, options, data=data_dir, progress=False))


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    from conftest import TEXT

    return torch.tensor([tokenizer.encode(TEXT + " " + TEXT)])


@torch.no_grad()
def test_split_mixers_compute_what_transformers_computes(tokenizer, ids):
    model = build_mamba2(len(tokenizer), use_bias=True)
    want = model(ids).logits
    got = split_mixers(model)(ids).logits
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), (got - want).abs().max()
    names = dict(model.named_parameters())
    assert names["backbone.layers.1.mixer.in_proj.b.weight"].shape == (G * N, HIDDEN)
    assert names["backbone.layers.1.mixer.in_proj.dt.bias"].shape == (H,)
    assert names["backbone.layers.0.mixer.conv1d.x.weight"].shape == (H * P, 1, 4)


def test_the_family_describes_the_model(tokenizer):
    model = split_mixers(build_mamba2(len(tokenizer)))
    config = model.config.to_dict()
    family = family_for(config)
    assert family is MAMBA2 and family.heads(config) is None
    family.check(config)
    family.check_tensors(config, {k: tuple(v.shape) for k, v in model.state_dict().items()}, {})
    p, n = family.groups(config, 1)
    assert (p.kind, p.width, p.granularity, n.kind, n.width, n.granularity) == (SSM_P, P, 32, SSM_N, N, 1)
    assert dict(p.members)["backbone.layers.1.mixer.out_proj.weight"] == f"cols/{H}"
    assert dict(n.members)["backbone.layers.1.mixer.in_proj.c.weight"] == f"rows/{G}"
    runtime = family.runtime_names(model.state_dict())
    assert runtime["backbone.layers.1.mixer.A_log"] == "layers.1.ssm_a"
    assert runtime["backbone.layers.0.mixer.in_proj.z.weight"] == "layers.0.ssm_in_z.weight"
    assert family.checkpoint_name("layers.0.ssm_dt") == "backbone.layers.0.mixer.dt_bias"


def test_a_bad_mamba2_config_names_the_field(tokenizer):
    config = mamba2_config(len(tokenizer)).to_dict()
    with pytest.raises(ElastiqError, match="config field expand is 3; expected num_heads x head_dim / hidden_size"):
        MAMBA2.check({**config, "expand": 3})
    with pytest.raises(ElastiqError, match="config field n_groups is 3; expected a divisor of num_heads"):
        MAMBA2.check({**config, "n_groups": 3})


def test_per_head_roles_keep_each_parts_prefix():
    """``rows/n`` and ``cols/n`` store unit j of every part together, so a prefix of units keeps the
    first units of each part (and a quantized matrix's input loses whole blocks)."""
    t = torch.arange(4 * 6 * 3).view(4 * 6, 3)
    s = to_storage(t, "rows/4", None)
    assert s.shape == (6, 4, 3)
    assert torch.equal(s[:2], t.view(4, 6, 3)[:, :2].transpose(0, 1))
    assert torch.equal(from_storage(s, "rows/4", None), t)
    o = torch.arange(3 * 4 * 6).view(3, 4 * 6)
    so = to_storage(o, "cols/4", None)
    assert so.shape == (6, 4, 3)
    assert torch.equal(from_storage(so, "cols/4", None), o)


def test_the_checkpoint_records_ssm_groups_and_no_attention(mamba2_checkpoint):
    ckpt = mamba2_checkpoint
    assert ckpt.heads is None
    assert {g.kind for g in ckpt.groups} == {SSM_P, SSM_N}
    rows = {r["rate"]: r for r in ckpt.manifest["rates"]}
    assert sorted(rows) == [0.0, 0.15, 0.35]
    assert all(r["kv_bytes_per_token"] == 0 for r in rows.values())
    assert rows[0.0]["weight_bytes"] > rows[0.15]["weight_bytes"] > rows[0.35]["weight_bytes"]
    for rate in (0.15, 0.35):
        widths = rows[rate]["widths"]
        assert all(widths[g.name] % g.granularity == 0 or widths[g.name] == g.width for g in ckpt.groups)
        assert rows[rate]["quality"]["kl_mean"] > 0
    assert rows[0.0]["quality"]["kl_mean"] < 1e-6


def sliced(weights: dict, ckpt: Checkpoint, rate: float) -> dict:
    """The full sorted model of ``ckpt`` cut to ``rate``'s widths by slicing each member tensor in
    its own layout (per head / per group, written apart from the checkpoint's reader)."""
    widths = ckpt.rate_entry(rate)["widths"]
    out = dict(weights)
    for g in ckpt.groups:
        for name, role in g.members:
            parts = int(role.split("/")[1])
            t = weights[name]
            axis = 1 if role.startswith("cols") else 0
            shaped = t.unflatten(axis, (parts, -1))
            out[name] = shaped.narrow(axis + 1, 0, widths[g.name]).flatten(axis, axis + 1)
    return out


@torch.no_grad()
def test_sorting_keeps_the_model_and_every_rate_is_its_slice(mamba2_checkpoint, mamba2_folder, ids):
    from transformers import Mamba2ForCausalLM

    from elastiq.modeling.model import Transformer

    ckpt = mamba2_checkpoint
    full = ckpt.read_rate(0.0)
    source = Mamba2ForCausalLM.from_pretrained(mamba2_folder).eval()
    want = source(ids).logits
    got = Transformer.from_weights(full, ckpt.config)(ids)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max(), rtol=0), (got - want).abs().max()
    for rate in (0.15, 0.35):
        read = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        cut = Transformer.from_weights(sliced(full, ckpt, rate), ckpt.config)(ids)
        assert torch.equal(read, cut)
        assert not torch.allclose(read, want, atol=1e-2)


# --- the engine: a Mamba2 checkpoint held in unit order, run at any rate and switched in place ---

RATES = (0.0, 0.15, 0.35)


@pytest.fixture(scope="module")
def mamba2_q4(mamba2_checkpoint, data_dir, tmp_path_factory) -> Checkpoint:
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path_factory.mktemp("mamba2-q4") / "q4.elastiq"
    return Checkpoint(quantize_checkpoint(mamba2_checkpoint.path, out, QuantizeOptions(method="rtn"), data=data_dir,
                                          progress=False))


@torch.no_grad()
def test_a_mixer_held_in_unit_order_computes_what_the_natural_one_does(mamba2_checkpoint, ids):
    """Every pruned tensor of each block in unit order (its projections through ``UnitOrdered``, its
    convolutions' and gated norm's channels through ``UnitOrderedParams``): the same logits, full
    pass and token by token. The output projection sums its input in another order, so float32
    rounding differs (relative 1e-5); the in-projections, convolutions and norm are gathered exactly."""
    from elastiq.modeling.model import SSMBlock, Transformer, UnitOrdered, UnitOrderedParams
    from elastiq.runtime.memory import held_orders

    ckpt = mamba2_checkpoint
    for rate in RATES:
        natural = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
        orders = held_orders(ckpt, rate)
        assert {k.partition(".")[2].partition(".")[2] for k in orders} == {
            "ssm_in_z", "ssm_in_x", "ssm_in_b", "ssm_in_c", "ssm_conv1d_x", "ssm_conv1d_b", "ssm_conv1d_c",
            "ssm_norm", "ssm_out"}
        held = Transformer.from_weights(dict(ckpt.iter_rate(rate, unit_order=True)), ckpt.config, orders=orders)
        block = held.layers[0]
        assert isinstance(block, SSMBlock) and isinstance(block.ssm_in_x, UnitOrdered)
        assert isinstance(block.ssm_conv1d_b, UnitOrderedParams) and isinstance(block.ssm_norm, UnitOrderedParams)
        want, got = natural(ids), held(ids)
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), (rate, (got - want).abs().max())
        # with the output projection in the model's order, bit for bit
        weights = dict(ckpt.iter_rate(rate, unit_order=True))
        for i in range(ckpt.config["num_hidden_layers"]):
            name = MAMBA2.name_of(i, "ssm_out")
            weights[name] = weights[name].index_select(1, torch.argsort(orders.pop(f"layers.{i}.ssm_out")[1]))
        assert torch.equal(Transformer.from_weights(weights, ckpt.config, orders=orders)(ids), want), rate
        held.setup_caches(1, 64)
        steps = [held(ids[:, :7], start=0)] + [held(ids[:, t:t + 1], start=t) for t in range(7, 12)]
        assert torch.allclose(torch.cat(steps, 1), want[:, :12], atol=1e-4 * want.abs().max(), rtol=0), rate


@torch.no_grad()
def test_the_engine_runs_each_rate_as_the_model_of_that_rate(mamba2_checkpoint, ids):
    from elastiq.modeling.model import Transformer
    from elastiq.runtime.engine import Engine

    ckpt = mamba2_checkpoint
    for rate in RATES:
        engine = Engine(ckpt, rate, ctx=64)
        assert engine.load_bytes == ckpt.rate_entry(rate)["weight_bytes"]
        want = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(ids)
        got = engine.logits(ids)
        # the output projection sums its input in unit order: float32 rounding (see above)
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max(), rtol=0), (rate, (got - want).abs().max())


def _grown_bytes(ckpt: Checkpoint, old: float, new: float) -> int:
    """Bytes of the units that rate ``new`` holds beyond rate ``old``'s, tensor by tensor (a rate's
    widths need not all be below a less pruned rate's: each block's are allocated apart)."""
    from elastiq.quants import BLOCK, BLOCK_BYTES

    def size(shape, dtype, fmt):
        return shape[0] * shape[1] // BLOCK * BLOCK_BYTES[fmt] if fmt else shape.numel() * dtype.itemsize

    before, after = ckpt.shapes(old), ckpt.shapes(new)
    return sum(max(0, size(torch.Size(after[n][0]), *after[n][1:]) - size(torch.Size(before[n][0]), *before[n][1:]))
               for n in after)


def _switches_as_fresh_loads(ckpt: Checkpoint, ids: torch.Tensor) -> None:
    """0.35 -> 0 -> 0.15 -> 0.35: bit for bit a fresh engine at each rate, reading only the units
    each switch lacks: nothing going down from 0, less than a fresh load going up."""
    from elastiq.runtime.engine import Engine

    engine = Engine(ckpt, 0.35, ctx=64)
    fresh = {r: Engine(ckpt, r, ctx=64) for r in RATES}
    rate = 0.35
    for new in (0.0, 0.15, 0.35):
        switch = engine.set_rate(new)
        assert switch.bytes_read == _grown_bytes(ckpt, rate, new), (rate, new, switch)
        if rate == 0.0:
            assert switch.bytes_read == 0, (rate, new, switch)
        if new < rate:  # less pruned
            assert 0 < switch.bytes_read < fresh[new].load_bytes, (rate, new, switch)
        rate = new
        with torch.no_grad():
            assert torch.equal(engine.model(ids), fresh[new].model(ids)), new
    assert engine.set_rate(0.35).bytes_read == 0


def test_the_engine_switches_a_mamba2_model_in_place(mamba2_checkpoint, ids):
    _switches_as_fresh_loads(mamba2_checkpoint, ids)


def test_the_engine_switches_a_4bit_mamba2_model_in_place(mamba2_q4, ids):
    from elastiq.runtime.engine import Engine

    engine = Engine(mamba2_q4, 0.0, ctx=64)
    assert engine.int4 and engine.dtype == torch.bfloat16
    # the default --q8 names attn_v, which a Mamba2 lacks: the manifest claims no Q8_0 matrix
    assert mamba2_q4.manifest["quantization"]["q8_0_matrices"] == []
    assert {mamba2_q4.format(n) for n in mamba2_q4.names if mamba2_q4.format(n)} == {"q4_0"}
    _switches_as_fresh_loads(mamba2_q4, ids)


@torch.no_grad()
def test_greedy_generation_after_a_switch_equals_argmax_of_full_passes(mamba2_checkpoint, tokenizer):
    from conftest import TEXT

    from elastiq.runtime.engine import Engine

    engine = Engine(mamba2_checkpoint, 0.0, ctx=64)
    prompt = tokenizer.encode(TEXT)[:10]
    engine.generator.generate(prompt, 3)  # states at the old widths, then cleared by the switch
    for rate in (0.35, 0.15):
        engine.set_rate(rate)
        expected = list(prompt)
        for _ in range(6):
            expected.append(int(engine.model(torch.tensor([expected]))[0, -1].argmax()))
        assert engine.generator.generate(prompt, 6).tokens == expected[10:], rate


def test_llama_cpp_runs_a_mamba2_and_goes_on_only_from_where_its_state_stands(mamba2_q4, tokenizer, tmp_path):
    """llama.cpp's mamba2 behind the engine: the footprint counts the export's bytes (within 2% before
    it exists) and one sequence's recurrent state, whatever the context; a conversation's next turn
    goes on from the state and gives what a fresh run gives; a prompt that goes back starts over
    (llama.cpp cannot take a recurrent state back: it failed to decode)."""
    import shutil

    pytest.importorskip("llama_cpp")
    from conftest import TEXT

    from elastiq.runtime.backends import backend, open_engine

    ckpt = Checkpoint(shutil.copytree(mamba2_q4.path, tmp_path / "m.elastiq"))
    llama = backend("llama.cpp")
    before = llama.footprint(ckpt, 0.35, 100, baseline=0)
    engine = open_engine("llama.cpp", ckpt.path, 0.35, ctx=100)
    after = llama.footprint(ckpt, 0.35, 100, baseline=0)
    assert abs(before.weights - after.weights) <= 0.02 * after.weights, (before, after)
    assert before.kv_cache == after.kv_cache == llama.footprint(ckpt, 0.35, 1000, baseline=0).kv_cache > 0
    assert engine.generator.recurrent
    g, prompt = engine.generator, tokenizer.encode(TEXT)[:10]
    first = g.generate(prompt, 6)
    follow = prompt + first.tokens + tokenizer.encode(" and")
    again = g.generate(follow, 4)
    assert again.reused == len(prompt) + 5  # the state stands after the five tokens run
    g.reset()
    fresh = g.generate(follow, 4)
    assert fresh.reused == 0 and fresh.tokens == again.tokens
    back = g.generate(prompt, 4)
    assert back.reused == 0 and back.tokens == first.tokens[:4]


def test_recovery_masks_compute_every_slice_of_a_mamba2(mamba2_checkpoint, ids):
    """Recovery's masks cut P at the gated norm (whose mean then runs over the kept channels only)
    and N at B, C and their convolutions' biases: with LoRA in every projection, the masked full
    model computes each rate's slice of the merged weights, and unmasked (or unhooked) the full model."""
    from torch import nn

    from elastiq.compressor.recover import UnitMasks, lora_model, merged_weights, width_units
    from elastiq.modeling.model import Transformer

    ckpt, weights = mamba2_checkpoint, mamba2_checkpoint.read_rate(0.0)
    model = lora_model(weights, ckpt.config, rank=4, alpha=8.0, seed=0)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 6  # the six projections of each of the two blocks
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.05)
        merged = merged_weights(model, weights, MAMBA2)
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
        assert torch.equal(model(ids), full)
        assert type(model.layers[0].ssm_conv1d_b) is nn.Conv1d  # the bias's parametrization is gone


def test_nested_recovery_of_a_mamba2_lowers_the_loss_at_every_rate(mamba2_checkpoint, data_dir, tmp_path):
    import torch.nn.functional as F

    from elastiq.compressor.calibrate import C4_SAMPLE, calibration_samples
    from elastiq.compressor.recover import RecoverError, RecoverOptions, recover_checkpoint
    from elastiq.modeling.model import Transformer

    options = RecoverOptions(steps=8, lr=1e-2, rank=4, alpha=8.0, batch=4, seqlen=32, samples=16, heldout=2,
                             lm_weight=1.0, bf16=False)
    out = Checkpoint(recover_checkpoint(mamba2_checkpoint.path, tmp_path / "r.elastiq", options, data=data_dir,
                                        progress=False))
    assert [(r["rate"], r["widths"]) for r in out.rate_table] == \
        [(r["rate"], r["widths"]) for r in mamba2_checkpoint.rate_table]
    windows = calibration_samples(out.tokenizer(), data_dir / C4_SAMPLE, 16, 32, 0)

    def loss(ckpt: Checkpoint, rate: float) -> float:
        with torch.no_grad():
            logits = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)(windows)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()

    for rate in mamba2_checkpoint.rates:
        assert loss(out, rate) < loss(mamba2_checkpoint, rate) - 0.05, rate
    with pytest.raises(RecoverError, match="LoRAShear.*SSM groups \\(ssm_n, ssm_p\\).*nested method"):
        recover_checkpoint(mamba2_checkpoint.path, tmp_path / "s.elastiq", RecoverOptions(method="lorashear"),
                           data=data_dir)
    assert not (tmp_path / "s.elastiq").exists()

"""The device side: KV-cache decoding, the 4-bit model and its 8-bit embedding and head, loading
one rate's bytes, switching rate in memory, memory prediction and rate choice, generation, chat and
the run command."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint, CheckpointError
from elastiq.cli import main
from elastiq.kernels import prepare_q4, q4_path
from elastiq.kernels import q4 as q4_kernels, q4_layout, q4_linear
from elastiq.kernels.q4 import int4pack_rows, int4pack_tile
from elastiq.kernels.q4_layout import q4_nbytes, q4_resize
from elastiq.kernels.q8 import INT8PACK_ROWS, prepare_q8, q8_embedding, q8_linear
from elastiq.quants import quantize_q8_0, quantize_rtn, unpack
from elastiq.runtime.chat import chat, template_ids
from elastiq.runtime.engine import Engine
from elastiq.runtime.generate import Generator, Sampling
from elastiq.machine import free_memory
from elastiq.runtime.memory import parse_size, predict_footprint
from elastiq.runtime.plan import plan_rate
from elastiq.modeling.model import Transformer
from conftest import TEXT

RATES = (0.0, 0.15, 0.35)


def _reference(ckpt: Checkpoint, rate: float) -> Transformer:
    """The float32 model of ``rate`` without caches (4-bit matrices dequantized)."""
    return Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_decoding_equals_the_full_pass(family, nested_checkpoints, tokenizer):
    ids = torch.tensor([tokenizer.encode(TEXT)])
    for rate in RATES:
        model = _reference(nested_checkpoints[family], rate)
        with torch.no_grad():
            full = model(ids)
            model.setup_caches(1, 64)
            steps = [model(ids[:, :5], start=0), model(ids[:, 5:12], start=5)]  # a chunk after a chunk
            steps += [model(ids[:, t:t + 1], start=t) for t in range(12, ids.shape[1])]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5, rate


def _assert_close_choices(got: torch.Tensor, want: torch.Tensor, rate: float) -> None:
    """``got`` logits [1, T, vocab] within 5% of ``want``'s scale, and the same next token wherever
    ``want``'s two best logits are more than twice the largest difference apart (no rounding within
    that difference can swap them); such decisive positions must be at least a quarter of them."""
    error = (got - want).abs().max()
    assert error < 0.05 * want.abs().max(), rate
    top = want[0].topk(2)
    decisive = top.values[:, 0] - top.values[:, 1] > 2 * error
    assert torch.equal(got[0].argmax(-1)[decisive], top.indices[decisive, 0]), rate
    assert decisive.float().mean() > 0.25, (rate, int(decisive.sum()))


def test_the_4bit_model_matches_its_dequantized_reference(nested_checkpoints, tokenizer):
    """Packed int4 weights with bf16 activations against the same codes dequantized to float32."""
    ids = torch.tensor([tokenizer.encode(TEXT)])
    ckpt = nested_checkpoints["qwen2-q4"]
    for rate in RATES:
        packed = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config,
                                          dtype=torch.bfloat16, int4=True)
        # 6 per block and the head packed; the Q8_0 value projections as two 4-bit halves
        assert sum(1 for m in packed.modules() if type(m).__name__ == "Q4Linear") == 2 * 6 + 1
        assert sum(1 for m in packed.modules() if type(m).__name__ == "Q8PairLinear") == 2
        with torch.no_grad():
            got, want = packed(ids).float(), _reference(ckpt, rate)(ids)
        # bf16 activations carry 8 significant bits through 2 blocks: a few percent of the logit scale
        _assert_close_choices(got, want, rate)


def test_8bit_block_matrices_refuse_activations_their_kernel_does_not_take(nested_checkpoints):
    """A model whose every block matrix is Q8_0 (two 4-bit halves, no Q4Linear) still says at build
    time that the CPU's 4-bit kernel multiplies bfloat16 only, not at its first matmul."""
    ckpt = nested_checkpoints["qwen2-q4"]
    weights = {name: quantize_q8_0(t.dequantize()) if hasattr(t, "codes") else t  # embedding and head too
               for name, t in ckpt.read_rate(0.0).items()}
    model = Transformer.from_weights(weights, ckpt.config, dtype=torch.bfloat16, int4=True)
    assert sum(type(m).__name__ == "Q8PairLinear" for m in model.modules()) == 7 * 2
    assert not any(type(m).__name__ == "Q4Linear" for m in model.modules())
    with pytest.raises(ElastiqError, match=f"4-bit matrices prepared for the {q4_path('cpu')} kernel multiply "
                                          "bfloat16 activations; the model was asked for float32"):
        Transformer.from_weights(weights, ckpt.config, dtype=torch.float32, int4=True)


@pytest.mark.parametrize("name", ["llama-q8", "qwen2-q8"])
def test_the_8bit_embedding_and_head_match_their_dequantized_reference(name, nested_checkpoints, tokenizer):
    """Q8_0 embedding and head held as 8-bit codes (one copy when tied) against float32."""
    ids = torch.tensor([tokenizer.encode(TEXT)])
    ckpt = nested_checkpoints[name]
    for rate in RATES:
        packed = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config,
                                          dtype=torch.bfloat16, int4=True)
        head, embed = packed.lm_head, packed.embed_tokens
        assert type(head).__name__ == "Q8Linear" and type(embed).__name__ == "Q8Embedding"
        assert (head.codes is embed.codes) == (name == "llama-q8")  # tied: one copy
        with torch.no_grad():
            got, want = packed(ids).float(), _reference(ckpt, rate)(ids)
            last = packed(ids, last_only=True).float()  # one row: the int8 matmul path
        _assert_close_choices(got, want, rate)
        assert (last[:, 0] - got[:, -1]).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize("rows", [1, INT8PACK_ROWS, 40])
def test_q8_matmul_and_lookup_equal_the_dequantized_matrix(rows):
    """Both paths of the 8-bit matmul (blockwise int8 for a few rows, dequantized slices for
    more) and the lookup against the dequantized matrix with the bf16 scales the runtime holds."""
    torch.manual_seed(0)
    t = quantize_q8_0(torch.randn(20000, 96))  # more output rows than one dequantized slice
    weight = prepare_q8(t.codes, t.scales, torch.bfloat16)
    assert weight.codes.shape == (3, 20000, 32) and weight.nbytes == 20000 * 96 + 20000 * 3 * 2
    w = (t.codes.double() * t.scales.bfloat16().double()[..., None]).flatten(-2)
    x = torch.randn(rows, 96).bfloat16()
    want = x.double() @ w.T
    got = q8_linear(x, weight).double()
    assert got.shape == (rows, 20000)
    assert (got - want).abs().max() < 2 ** -7 * want.abs().max()  # bf16 outputs and partial sums
    ids = torch.tensor([[5, 19999, 0]])
    assert torch.equal(q8_embedding(ids, weight).double(), w[ids].bfloat16().double())
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 96\]"):
        q8_linear(torch.randn(1, 64).bfloat16(), weight)


@pytest.mark.parametrize("shape", [(486, 576), (96, 480), (112, 64), (48, 64), (7300, 576)])
def test_prepared_weights_predict_their_size(shape, monkeypatch):
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")  # torch's int4pack layout (elastiq's own: test_cpu_ops)
    codes, scales = quantize_rtn(torch.randn(*shape))
    weight = prepare_q4(codes, scales)
    assert weight.nbytes == q4_nbytes(*shape, weight.path)
    pad = int4pack_rows(shape[0]) - shape[0]
    assert 0 <= pad < int4pack_tile() and weight.packed.shape[0] == shape[0] + pad
    if shape[0] > 7232:  # repacked in row blocks: the same bytes as torch's repack of the whole
        whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(F.pad(unpack(codes), (0, 0, 0, pad)).int(), 1)
        assert torch.equal(weight.packed, whole)


def test_torch_int4_layout_has_the_tiles_a_resize_relies_on():
    assert int4pack_tile() in (32, 64)  # AVX2 and AVX-512 builds; None would make every switch repack


def _resize_walk(codes, scales, axis, sizes, x):
    """Resize a held weight through ``sizes`` along ``axis``; after each step it must multiply as a
    fresh prepare of that width does, hold what q4_nbytes predicts, and have read only what it lacked."""
    cut = (lambda t, n: t[:n]) if axis == 0 else (lambda t, n: t[:, :n // 32])  # noqa: E731
    reads = []

    def read(start, end):
        reads.append((start, end))
        return (codes[start:end], scales[start:end]) if axis == 0 else \
            (codes[:, start // 32:end // 32], scales[:, start // 32:end // 32])

    weight = prepare_q4(cut(codes, sizes[0]), cut(scales, sizes[0]))
    for old, new in zip(sizes, sizes[1:]):
        reads.clear()
        weight = q4_resize(weight, new, axis, read)
        fresh = prepare_q4(cut(codes, new), cut(scales, new))
        inputs = x if axis == 0 else x[:, :new]
        assert torch.equal(q4_linear(inputs, weight), q4_linear(inputs, fresh)), (old, new)
        assert weight.nbytes == fresh.nbytes == q4_nbytes(fresh.out_features, fresh.in_features, fresh.path)
        yield old, new, reads, weight, fresh


@pytest.mark.parametrize("kernel", ["elastiq", "torch"])
@pytest.mark.parametrize("axis", [0, 1])
def test_held_weights_are_cut_without_reading_and_grown_by_what_they_lack(axis, kernel, monkeypatch):
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", kernel)
    torch.manual_seed(0)
    codes, scales = quantize_rtn(torch.randn(200, 320))
    x = torch.randn(3, 320).bfloat16()
    sizes = [100, 150, 37, 64, 200, 5, 96, 200, 1, 133] if axis == 0 else [96, 160, 32, 320, 64, 288, 32]
    for old, new, reads, weight, fresh in _resize_walk(codes, scales, axis, sizes, x):
        assert weight.path == q4_path("cpu") and reads == ([] if new < old else [(old, new)])
        if kernel == "elastiq" or axis == 1 or new % int4pack_tile() == 0:  # else the last int4pack tile's
            # spare rows may keep a wider rate's codes
            assert torch.equal(weight.packed, fresh.packed) and torch.equal(weight.scales, fresh.scales)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="triton is not installed")
@pytest.mark.parametrize("axis", [0, 1])
def test_triton_held_weights_resize_as_slices(axis, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    codes, scales = quantize_rtn(torch.randn(96, 128))
    x = torch.randn(2, 128).bfloat16()
    sizes = [40, 96, 7, 64] if axis == 0 else [64, 128, 32, 96]
    for old, new, reads, weight, fresh in _resize_walk(codes, scales, axis, sizes, x):
        assert weight.path == "triton" and reads == ([] if new < old else [(old, new)])
        assert torch.equal(weight.packed, fresh.packed) and torch.equal(weight.scales, fresh.scales)


def test_without_a_known_tile_a_resize_repacks_the_new_width_from_the_file(monkeypatch):
    monkeypatch.setenv("ELASTIQ_CPU_KERNEL", "torch")
    codes, scales = quantize_rtn(torch.randn(120, 64))
    monkeypatch.setattr(q4_kernels, "int4pack_tile", lambda: None)  # a torch whose int4 layout elastiq does not know
    monkeypatch.setattr(q4_layout, "int4pack_tile", lambda: None)
    x = torch.randn(2, 64).bfloat16()
    for old, new, reads, weight, fresh in _resize_walk(codes, scales, 0, [120, 50, 120], x):
        assert reads == [(0, new)] and weight.packed.shape[0] % 16 == 0


@pytest.mark.parametrize("name", ["llama", "qwen2-q4", "qwen2-q8"])
def test_engine_reads_only_its_rate_and_switches_in_memory(name, nested_checkpoints, tokenizer):
    ckpt = nested_checkpoints[name]
    ids = torch.tensor([tokenizer.encode(TEXT)])
    engine = Engine(ckpt.path, 0.15, ctx=64)
    entry = lambda r: engine.ckpt.rate_entry(r)["weight_bytes"]  # noqa: E731
    assert engine.load_bytes == entry(0.15)
    fresh = {r: Engine(ckpt.path, r, ctx=64).model for r in RATES}
    for rate, expected_read in ((0.35, 0), (0.0, entry(0.0) - entry(0.35)), (0.15, 0), (0.35, 0)):
        switch = engine.set_rate(rate)
        assert switch.bytes_read == expected_read, (rate, switch)
        with torch.no_grad():
            assert torch.equal(engine.model(ids), fresh[rate](ids)), rate  # bit for bit a fresh load
    assert engine.set_rate(0.35).bytes_read == 0  # the same rate: nothing to do


def test_footprint_prediction_counts_what_the_engine_holds(nested_checkpoints):
    for name in ("llama", "qwen2-q4", "llama-q8", "qwen2-q8"):
        ckpt = nested_checkpoints[name]
        for rate in RATES:
            engine = Engine(ckpt.path, rate, ctx=64)
            f = predict_footprint(ckpt, rate, 64, engine.dtype, engine.int4, baseline=0)
            assert f.weights == engine.weight_bytes(), (name, rate)
            caches = sum(layer.kv_cache.k.nbytes + layer.kv_cache.v.nbytes
                         for layer in engine.model.layers)
            assert f.kv_cache == caches
            assert f.workspace > 0 and f.total == f.weights + f.kv_cache + f.workspace


def test_rate_plan_picks_the_least_pruned_rate_that_fits(nested_checkpoints):
    ckpt = nested_checkpoints["llama-q4"]
    base = 300 * 2**20  # a fixed process baseline, so that every plan sees the same totals
    plans = {r: plan_rate(ckpt, r, 64, torch.bfloat16, True, baseline=base) for r in RATES}
    totals = {r: p.footprints[RATES.index(r)].total for r, p in plans.items()}
    assert totals[0.0] > totals[0.15] > totals[0.35]
    assert plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.0], baseline=base).rate == 0.0
    plan = plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.15] + 1, baseline=base)
    assert plan.rate == 0.15 and "rate 0.0 needs" in plan.reason
    with pytest.raises(ElastiqError, match=r"no offered rate fits the budget of .* rate 0.35: \d+ MiB"):
        plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.35] - 1, baseline=base)
    with pytest.raises(CheckpointError, match="rate 0.3 is not offered .* offered: 0.0, 0.15, 0.35"):
        plan_rate(ckpt, 0.3, 64, torch.bfloat16, True)
    assert plan_rate(ckpt, None, 64, torch.bfloat16, True).rate == 0.0  # this machine has room for a tiny model


def test_quality_floor_keeps_a_broken_rate_from_being_chosen(nested_checkpoints, tmp_path, capsys):
    """A copy of a checkpoint whose recorded KL puts rate 0.35 over the floor: the planner, --rate
    and /rate refuse it unless --max-kl allows it, and say what quality they chose."""
    import shutil

    from elastiq.checkpoint import record_quality

    path = shutil.copytree(nested_checkpoints["llama-q4"].path, tmp_path / "floor.elastiq")
    measured = {0.0: 0.02, 0.15: 0.2, 0.35: 1.5}
    record_quality(Checkpoint(path), {r: {"heldout_ppl": 10.0 + kl, "kl_mean": kl, "kl_p99": 3 * kl,
                                          "top1_agreement": 0.9 - kl / 2, "tokens": 100} for r, kl in measured.items()})
    ckpt = Checkpoint(path)
    base = 300 * 2**20
    totals = {f.rate: f.total for f in plan_rate(ckpt, 0.0, 64, torch.bfloat16, True, baseline=base).footprints}
    plan = plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.15], baseline=base)
    assert plan.rate == 0.15 and "KL 0.200 nats to the dense model, same top-1 80%, held-out perplexity 10.2" in \
        plan.reason
    with pytest.raises(ElastiqError, match=r"the rates that fit the budget .* are below the quality floor of 0.5 "
                                           r"nats .* rate 0.35 \(KL 1.500 nats .*pass --max-kl inf"):
        plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.35], baseline=base)
    assert plan_rate(ckpt, None, 64, torch.bfloat16, True, memory_budget=totals[0.35], baseline=base,
                     max_kl=float("inf")).rate == 0.35
    with pytest.raises(ElastiqError, match=r"rate 0.35 is below the quality floor: KL 1.500 nats .* over the 0.5 "
                                           r"nats allowed; pass --max-kl inf"):
        plan_rate(ckpt, 0.35, 64, torch.bfloat16, True)
    assert plan_rate(ckpt, 0.35, 64, torch.bfloat16, True, max_kl=2.0).rate == 0.35

    out = []
    chat(Engine(path, 0.0, ctx=128), ["/rate 0.35", "/rate 0.15", "/rate"], out.append)
    text = "".join(out)
    assert "[error: rate 0.35 is below the quality floor" in text and "rate 0.0 -> 0.15" in text
    assert "rate 0.15 (KL 0.200 nats" in text
    args = ["run", str(path), "--prompt", "Hello", "--max-new-tokens", "2", "--ctx", "64", "--rate", "0.35"]
    assert main(args) == 2 and "rate 0.35 is below the quality floor" in capsys.readouterr().err
    assert main(args + ["--max-kl", "inf"]) == 0 and "rate 0.35 as asked" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--max-kl", "-1"])
    assert "a KL divergence in nats (0 or more, or inf), got '-1'" in capsys.readouterr().err


def test_free_memory_honours_cgroup_limits(tmp_path):
    unlimited = free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "none")
    assert unlimited.source == "psutil available memory" and unlimited.bytes > 0
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "memory.max").write_text(f"{300 * 2**20}\n")
    (tmp_path / "app" / "memory.current").write_text(f"{100 * 2**20}\n")
    (tmp_path / "v2").write_text("0::/app\n")
    v2 = free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "v2")
    assert v2.bytes == 200 * 2**20 and "cgroup v2" in v2.source
    (tmp_path / "app" / "memory.max").write_text("max\n")
    assert free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "v2").source == "psutil available memory"
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{64 * 2**20}\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{16 * 2**20}\n")
    (tmp_path / "v1").write_text("5:cpu,cpuacct:/\n4:memory:/\n")
    v1 = free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "v1")
    assert v1.bytes == 48 * 2**20 and "cgroup v1" in v1.source
    # file cache the kernel reclaims first (the weights file, once read) is not memory in use
    (tmp_path / "memory" / "memory.stat").write_text(f"cache {12 * 2**20}\ntotal_inactive_file {10 * 2**20}\n")
    assert free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "v1").bytes == 58 * 2**20
    (tmp_path / "app" / "memory.max").write_text(f"{300 * 2**20}\n")
    (tmp_path / "app" / "memory.stat").write_text(f"anon {90 * 2**20}\ninactive_file {4 * 2**20}\n")
    assert free_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "v2").bytes == 204 * 2**20


def test_sizes_parse_and_bad_ones_say_what_is_accepted():
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("800MB") == 800 * 10**6 and parse_size("4096") == 4096
    with pytest.raises(ElastiqError, match="write e.g. 1.5GiB"):
        parse_size("lots")


def test_greedy_generation_equals_argmax_of_full_passes(nested_checkpoints, tokenizer):
    ckpt = nested_checkpoints["llama"]
    model = _reference(ckpt, 0.15)
    prompt = tokenizer.encode(TEXT)[:10]
    with torch.no_grad():
        expected = list(prompt)
        for _ in range(12):
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    generator = Generator(model, 64)
    seen = []
    stats = generator.generate(prompt, 12, on_token=seen.append)
    assert stats.tokens == seen == expected[10:]
    assert generator.cached == expected[:-1]  # the last token is run on the next call
    again = generator.generate(expected[:-1] + [expected[-1]], 3)  # a follow-up reuses the whole cache
    assert again.reused == len(expected) - 1 and again.prefilled == 1
    stop = expected[12]
    stopped = Generator(model, 64).generate(prompt, 12, stop=[stop])
    assert stopped.tokens == expected[10:expected.index(stop, 10) + 1]
    first = Generator(model, 64).generate(prompt, 8, Sampling(temperature=1.0, top_k=5, seed=7)).tokens
    assert first == Generator(model, 64).generate(prompt, 8, Sampling(temperature=1.0, top_k=5, seed=7)).tokens
    with pytest.raises(ElastiqError, match="the context holds 8"):
        Generator(model, 8).generate(tokenizer.encode(TEXT), 2)


def test_chat_switches_rate_and_continues_the_conversation(nested_checkpoints):
    engine = Engine(nested_checkpoints["llama-q4"].path, 0.0, ctx=128)
    out = []
    messages = chat(engine, ["Hello there", "/rate 0.35", "How are you", "/rate 0.3", "/rate", "/quit", "never"],
                    out.append, max_new_tokens=6)
    text = "".join(out)
    assert "rate 0.0 -> 0.35" in text and "0.0 MB read" in text and "conversation re-filled" in text
    assert "[error: rate 0.3 is not offered" in text and "rate 0.35 (KL " in text
    assert "); offered: 0.0, 0.15, 0.35" in text
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # the reply after the switch is what a fresh engine at 0.35 says to the same conversation
    fresh = Engine(nested_checkpoints["llama-q4"].path, 0.35, ctx=128)
    ids = template_ids(fresh.tokenizer, messages[:3], add_generation_prompt=True)
    expected = fresh.generator.generate(ids, 6, stop=[fresh.tokenizer.eos_token_id]).tokens
    assert fresh.tokenizer.decode(expected, skip_special_tokens=True) == messages[3]["content"]


def test_run_command_says_which_rate_and_why(nested_checkpoints, capsys):
    path = str(nested_checkpoints["qwen2-q4"].path)
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64"]) == 0
    err = capsys.readouterr().err
    assert "rate 0.0: the least-pruned rate whose predicted" in err and "loaded rate 0.0" in err
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64", "--rate", "0.35"]) == 0
    assert "rate 0.35 as asked" in capsys.readouterr().err
    assert main(["run", path, "--prompt", "Hello", "--ctx", "100000"]) == 2
    assert "--ctx 100000 is outside what the model supports: 2 to 256" in capsys.readouterr().err
    assert main(["run", path, "--prompt", "Hello", "--memory-budget", "1MiB", "--ctx", "64"]) == 2
    assert "no offered rate fits the budget of 1 MiB" in capsys.readouterr().err


def test_a_damaged_checkpoint_names_the_tensor(nested_checkpoints, tmp_path):
    import shutil

    path = shutil.copytree(nested_checkpoints["llama-q4"].path, tmp_path / "bad.elastiq")
    ckpt = Checkpoint(path)
    name = "model.layers.1.mlp.up_proj.weight.q4_codes"
    start, _ = ckpt._offsets[name]
    with open(path / "weights.safetensors", "r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=f"tensor {name}: units .* fail their sha256 check"):
        Engine(path, 0.0, ctx=64)
    Engine(path, 0.0, ctx=64, verify=False)  # --no-verify loads it
    size = os.path.getsize(path / "weights.safetensors")
    with open(path / "weights.safetensors", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="is truncated: tensor .* ends at byte"):
        Engine(path, 0.0, ctx=64)


def test_a_failed_grow_leaves_the_engine_at_its_rate(nested_checkpoints, tmp_path, tokenizer):
    import shutil

    path = shutil.copytree(nested_checkpoints["llama-q4"].path, tmp_path / "tail.elastiq")
    name = "model.layers.1.mlp.up_proj.weight.q4_codes"
    _, end = Checkpoint(path)._offsets[name]
    with open(path / "weights.safetensors", "r+b") as f:  # the last unit: only rate 0 reads it
        f.seek(end - 1)
        byte = f.read(1)
        f.seek(end - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    engine = Engine(path, 0.35, ctx=64)
    with pytest.raises(CheckpointError, match=f"tensor {name}: units .* fail their sha256 check"):
        engine.set_rate(0.0)  # layer 0 grows first, then layer 1's read fails
    assert engine.rate == 0.35
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(engine.model(ids), Engine(path, 0.35, ctx=64).model(ids))
    assert engine.generator.generate(tokenizer.encode(TEXT)[:8], 3).decoded == 3

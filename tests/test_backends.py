"""Backends: llama.cpp and onnxruntime engines on a cached export generate as the torch Engine does,
switch rate in chat, and plan their rate from their own footprint."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import Checkpoint
from elastiq.cli import main
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
from elastiq.runtime.backends import backend as backend_named, exported, open_engine
from elastiq.runtime.backends.exported import ExportEngine, export_path
from elastiq.runtime.backends.llamacpp import LLAMA_CTX_PAD, LlamaCppEngine
from elastiq.runtime.backends.onnxrt import OnnxEngine
from elastiq.runtime.chat import chat, stop_ids, template_ids
from elastiq.runtime.engine import Engine
from elastiq.runtime.generate import Generator, Sampling
from elastiq.runtime.memory import predict_footprint
from elastiq.runtime.plan import plan_rate
from elastiq.modeling.model import Transformer
from conftest import TEXT, context_dependent, reseal

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

RATES = (0.0, 0.15, 0.35)
STEPS = 24  # greedy tokens compared
ENGINES = {"llama.cpp": LlamaCppEngine, "onnxruntime": OnnxEngine}
# Gap between the two best logits, as a share of the largest logit, under which the backend may pick
# either (a near tie). onnxruntime computes in float32 as the reference does (measured: ~1e-6 of the
# logits in test_export_onnx). llama.cpp holds F16 weights for a float checkpoint and rounds every
# matmul input to fp16 (test_export_gguf bounds that at 0.3% of the largest logit: twice that is a
# tie); for a 4-bit one it rounds every Q4_0 matmul input to Q8_0, which with these unit-gain blocks
# puts its logits a few percent from the float32 reference, so a gap under 5% may go either way.
NEAR_TIE = {("llama.cpp", "float"): 6e-3, ("llama.cpp", "q4"): 0.05,
            ("onnxruntime", "float"): 1e-4, ("onnxruntime", "q4"): 1e-4}
DECISIVE = 8  # steps of the STEPS that must be beyond a near tie, so that the comparison has teeth


@pytest.fixture(scope="module")
def checkpoints(tokenizer, data_dir, tmp_path_factory) -> dict[str, Checkpoint]:
    """A tiny Llama whose greedy output depends on the context (unit-gain blocks, small tied
    embeddings, a final norm of 20: see test_export_gguf), as a float and a 4-bit (RTN) checkpoint,
    and 4-bit with an 8-bit embedding."""
    root = tmp_path_factory.mktemp("backends")
    context_dependent("llama", tokenizer, root / "src")
    # Unmeasured quality: this model is built for context-dependent greedy output, and its pruned rates are
    # far from it; the quality floor is tested in test_runtime.
    options = CompressOptions(rates=RATES[1:], calib_samples=4, calib_seqlen=32, quality_windows=0)
    float_path = compress(root / "src", root / "f.elastiq", options, data=data_dir, progress=False)
    q4_path = quantize_checkpoint(float_path, root / "q.elastiq", QuantizeOptions(method="rtn", quality_windows=0),
                                  data=data_dir, progress=False)
    q8_path = quantize_checkpoint(float_path, root / "q8.elastiq",
                                  QuantizeOptions(method="rtn", embedding_bits=8, quality_windows=0), data=data_dir,
                                  progress=False)
    return {"float": Checkpoint(float_path), "q4": Checkpoint(q4_path), "q8": Checkpoint(q8_path)}


def _reference(ckpt: Checkpoint, rate: float) -> Transformer:
    """The torch runtime's float32 model of ``rate`` (4-bit matrices dequantized: the torch Engine's
    int4 path computes in bfloat16, which is itself a few percent from these logits)."""
    return Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)


def _greedy(model: Transformer, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens through the torch Generator's cache, one decode step at a time."""
    generator = Generator(model, 128)
    logits, _ = generator.prefill(ids)
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), start=len(generator.cached))[0, -1]
        generator.cached.append(tokens[-1])
    return tokens


@pytest.mark.parametrize("backend", list(ENGINES))
@pytest.mark.parametrize("name", ["float", "q4"])
def test_greedy_tokens_equal_the_torch_engine(backend, name, checkpoints, tokenizer):
    ids = tokenizer.encode(TEXT)
    for rate in (0.0, 0.35):
        reference = _reference(checkpoints[name], rate)
        if name == "float":  # the torch Engine itself, float32 here
            with torch.no_grad():
                expected = _greedy(reference, ids, STEPS)
            assert Engine(checkpoints[name].path, rate, ctx=128).generator.generate(ids, STEPS).tokens == expected
        engine = ENGINES[backend](checkpoints[name], rate, ctx=128)
        got = engine.generator.generate(ids, STEPS).tokens
        # at every step of the backend's own continuation, its token is the reference's argmax, unless
        # the reference's two best logits there are a near tie (checking the backend's continuation, not
        # the reference's, keeps one near tie from ending the comparison)
        with torch.no_grad():
            logits = reference(torch.tensor([ids + got[:-1]]))[0]
        top = logits[len(ids) - 1:].topk(2)
        decisive = top.values[:, 0] - top.values[:, 1] > NEAR_TIE[backend, name] * logits.abs().max()
        assert torch.equal(top.indices[:, 0][decisive], torch.tensor(got)[decisive]), (backend, name, rate)
        assert int(decisive.sum()) >= DECISIVE, (backend, name, rate, int(decisive.sum()))
        assert len(set(got[:16])) >= 6  # each step is a real choice, not one token repeated


@pytest.mark.parametrize("backend", list(ENGINES))
def test_prefix_reuse_stops_and_sampling_follow_the_torch_generator(backend, checkpoints, tokenizer):
    ckpt = checkpoints["float"]
    engine = ENGINES[backend](ckpt, 0.15, ctx=64)
    prompt = tokenizer.encode(TEXT)[:10]
    first = engine.generator.generate(prompt, 8)
    assert (first.reused, first.prefilled, first.decoded) == (0, 10, 8)
    assert engine.generator.cached == prompt + first.tokens[:-1]  # the last token runs on the next call
    follow = prompt + first.tokens + tokenizer.encode(" and")
    again = engine.generator.generate(follow, 4)
    assert again.reused == len(prompt) + 7 and again.prefilled == len(follow) - again.reused
    engine.generator.reset()
    fresh = engine.generator.generate(follow, 4)
    assert fresh.reused == 0 and fresh.tokens == again.tokens  # reusing the cache changes nothing
    stop = first.tokens[3]
    engine.generator.reset()
    assert engine.generator.generate(prompt, 8, stop=[stop]).tokens == first.tokens[:first.tokens.index(stop) + 1]
    sampling = Sampling(temperature=1.0, top_k=5, seed=7)
    sampled = engine.generator.generate(prompt, 8, sampling).tokens
    assert sampled == engine.generator.generate(prompt, 8, sampling).tokens  # seeded
    if backend == "onnxruntime":  # float32 logits as torch's: the same draws from the same seed
        assert sampled == Engine(ckpt.path, 0.15, ctx=64).generator.generate(prompt, 8, sampling).tokens
    with pytest.raises(ElastiqError, match="the context holds 64"):
        engine.generator.generate(list(range(64)), 2)


@pytest.mark.parametrize("backend", list(ENGINES))
def test_export_is_written_once_and_reused(backend, checkpoints, tmp_path, monkeypatch):
    ckpt = Checkpoint(shutil.copytree(checkpoints["q4"].path, tmp_path / "m.elastiq"))
    engine = ENGINES[backend](ckpt, 0.15, ctx=64)
    path = engine.export
    assert path == export_path(ckpt, 0.15, engine.format) and path.parent.name == "m.elastiq.exports"
    assert path.name.startswith("rate-0.15-") and engine.export_seconds > 0
    assert engine.load_bytes == path.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing partial left beside it
    mtime = path.stat().st_mtime_ns

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(exported, "export", no_export)
    again = ENGINES[backend](ckpt.path, 0.15, ctx=64)
    assert again.export == path and again.export_seconds is None and path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    manifest = json.loads((ckpt.path / "manifest.json").read_text())  # the checkpoint changes
    manifest["source"]["name"] = "changed"
    (ckpt.path / "manifest.json").write_text(json.dumps(manifest))
    reseal(ckpt.path)  # a rebuilt checkpoint, not a damaged one
    changed = ENGINES[backend](ckpt.path, 0.15, ctx=64)
    assert changed.export != path and changed.export_seconds > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [changed.export.name]  # the stale one is gone


@pytest.mark.parametrize("backend", list(ENGINES))
def test_chat_switches_rate_on_each_backend(backend, checkpoints):
    ckpt = checkpoints["q4"]
    engine = open_engine(backend, ckpt.path, 0.0, ctx=128)
    out = []
    messages = chat(engine, ["Hello there", "/rate 0.35", "How are you", "/rate 0.3", "/rate", "/quit"],
                    out.append, max_new_tokens=6)
    text = "".join(out)
    size = export_path(engine.ckpt, 0.35, engine.format).stat().st_size
    assert "rate 0.0 -> 0.35" in text and f"{size / 1e6:.1f} MB read" in text and "conversation re-filled" in text
    assert "[error: rate 0.3 is not offered" in text and "rate 0.35 (quality not measured); offered: 0.0, 0.15, 0.35" in text
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert engine.rate == 0.35 and engine.export.name.startswith("rate-0.35-")
    # the reply after the switch is what a fresh engine at 0.35 says to the same conversation
    fresh = open_engine(backend, ckpt.path, 0.35, ctx=128)
    ids = template_ids(fresh.tokenizer, messages[:3], add_generation_prompt=True)
    expected = fresh.generator.generate(ids, 6, stop=stop_ids(fresh.tokenizer)).tokens
    assert fresh.tokenizer.decode(expected, skip_special_tokens=True) == messages[3]["content"]


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_footprints_predict_what_each_backend_holds(name, checkpoints, tmp_path):
    ckpt = Checkpoint(shutil.copytree(checkpoints[name].path, tmp_path / "m.elastiq"))
    for backend in ENGINES:
        for rate in RATES:
            before = backend_named(backend).footprint(ckpt, rate, 100, baseline=0)
            engine = ENGINES[backend](ckpt, rate, ctx=100)
            after = backend_named(backend).footprint(ckpt, rate, 100, baseline=0)
            # before the export, its size is derived from the shapes as the exporter writes them: GGUF's
            # tensors and vocabulary within 2%; ONNX's initializers, not its graph (nodes and RoPE
            # tables: measured ~8 KB per layer here, 5.6 KB per layer and 0.3% of SmolLM2's 68 MB export)
            if backend == "llama.cpp":
                assert abs(before.weights - after.weights) <= 0.02 * after.weights, (rate, before, after)
            else:  # counted twice: the initializers and onnxruntime's prepacked copy
                assert 0 <= after.weights - before.weights <= 2 * 2 * 10_000, (rate, before, after)
            assert before.kv_cache == after.kv_cache and before.workspace == after.workspace
            if backend == "llama.cpp":
                assert engine.generator.llm.n_ctx() == LLAMA_CTX_PAD  # 100 positions take 256 cells
                layers, heads = 2, ckpt.heads
                assert after.kv_cache == LLAMA_CTX_PAD * layers * 2 * heads.num_kv_heads * heads.head_dim * 2
                assert after.weights >= engine.load_bytes  # the mapped file, and its repacked Q4_0 matrices
            else:
                torch_kv = predict_footprint(ckpt, rate, 100, torch.float32, False, 0).kv_cache
                assert after.kv_cache == 2 * torch_kv  # float32 past and present
                assert after.weights == 2 * engine.load_bytes
    # llama.cpp's KV cache is at the full head size whatever the rate; the others' shrink with it
    kv = {b: [backend_named(b).footprint(ckpt, r, 100, 0).kv_cache for r in RATES] for b in ENGINES}
    assert len(set(kv["llama.cpp"])) == 1 and kv["onnxruntime"][0] > kv["onnxruntime"][2]


def test_plan_rate_uses_the_backends_footprint(checkpoints):
    ckpt = checkpoints["q4"]
    base = 500 * 2**20  # a fixed process baseline: a measured one moves between calls by more than rates differ
    torch_plan = plan_rate(ckpt, None, 64, torch.bfloat16, True, baseline=base)
    for backend in ENGINES:
        plan = plan_rate(ckpt, None, 64, torch.float32, True, backend=backend, baseline=base)
        totals = {f.rate: f.total for f in plan.footprints}
        assert totals != {f.rate: f.total for f in torch_plan.footprints}
        fits = plan_rate(ckpt, None, 64, torch.float32, True, totals[0.15] + 1, backend=backend, baseline=base)
        assert fits.rate == 0.15
        assert plan_rate(ckpt, None, 64, torch.float32, True, totals[0.0], backend=backend, baseline=base).rate == 0.0
        with pytest.raises(ElastiqError, match=r"no offered rate fits the budget of .* rate 0.35: \d+ MiB"):
            plan_rate(ckpt, None, 64, torch.float32, True, totals[0.35] // 2, backend=backend, baseline=base)
    with pytest.raises(ElastiqError, match="backend 'tensorrt' is not known; accepted: torch, llama.cpp, onnxruntime"):
        plan_rate(ckpt, None, 64, torch.float32, True, backend="tensorrt")


def test_a_missing_package_says_what_to_install(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ElastiqError, match=r"the llama.cpp backend needs the Python package llama_cpp .*"
                                           r"`pip install llama-cpp-python`.* or run with --backend torch"):
        LlamaCppEngine(checkpoints["q4"].path, 0.0, ctx=64)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ElastiqError, match=r"needs the Python package onnxruntime .*`pip install onnxruntime`"):
        plan_rate(checkpoints["q4"], None, 64, torch.float32, True, backend="onnxruntime")
    with pytest.raises(ElastiqError, match="backend 'mlx' is not known"):
        backend_named("mlx")
    assert issubclass(LlamaCppEngine, ExportEngine)


def test_run_command_on_each_backend(checkpoints, capsys):
    path = str(checkpoints["q4"].path)
    for backend in ENGINES:
        assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "4", "--ctx", "64", "--backend",
                     backend, "--rate", "0.15"]) == 0
        err = capsys.readouterr().err
        assert "rate 0.15 as asked (predicted" in err and f"on {backend}" in err and f"{backend} runs " in err
        assert main(["run", path, "--prompt", "Hello", "--ctx", "64", "--backend", backend, "--dtype", "bfloat16"]) == 2
        assert f"--dtype bfloat16 applies to the torch backend; {backend} computes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", path, "--prompt", "Hello", "--backend", "tensorrt"])
    assert exit_.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err

"""The families added through the family description alone, end to end: Qwen3 (q and k normalised
per head before RoPE), Gemma 3 (that, plus branch output norms, GeGLU, scaled embeddings, offset
norm weights and sliding-window layers with their own RoPE base), both offering MLP channels and
V/O rank only, and Phi-3 (fused projections, split at intake into Mistral's). Each is compressed,
run, decoded, switched, quantized and exported, and compared with transformers, onnxruntime and
llama.cpp. A new family adds its tiny configuration to ``CONFIGS``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastiq.checkpoint import MLP, QK, VO, Checkpoint
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.families import family_for
from elastiq.modeling.model import Transformer
from conftest import TEXT, dense_gguf, masked_weights, tiny_config

RATES = (0.125, 0.375)  # whole 32-channel blocks of these tiny models


def _gemma3(vocab_size: int):
    """Six layers, so that llama.cpp's layout (five sliding, one global) is all there; a window of
    8 positions, so that it matters on short texts."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=8, max_position_embeddings=256, tie_word_embeddings=True,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _qwen3(vocab_size: int):
    config = tiny_config("qwen3", vocab_size)
    config.intermediate_size = 256  # without Q/K pairs, rates need finer MLP blocks than the other families' 96
    return config


def _phi3(vocab_size: int):
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=24,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)


CONFIGS = {"qwen3": _qwen3, "gemma3": _gemma3, "phi3": _phi3}
# Norm weights of this size scale by about 1 (Gemma stores w for a scale of 1 + w).
NORM_CENTRE = {"qwen3": 1.0, "gemma3": 0.0, "phi3": 1.0}
OFFERS = {"qwen3": {MLP, VO}, "gemma3": {MLP, VO}, "phi3": {MLP, QK, VO}}
KEPT = {"qwen3": "Qwen3", "gemma3": "Gemma 3"}  # families that keep every q/k channel, as inspect names them
HF_EXPORT = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "MistralForCausalLM"}


def _unit_gain(model: torch.nn.Module, family: str, seed: int = 7) -> torch.nn.Module:
    """``model`` with unit-gain blocks (as tests/test_export_gguf.py explains) and every norm weight
    away from its neutral value, so that each one, and the attention pattern, matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(NORM_CENTRE[family] - 0.5 + 1.5 * torch.rand(p.shape, generator=gen))
            elif p.dim() == 2:
                p.normal_(0, 0.05 if "embed" in name else p.shape[1] ** -0.5, generator=gen)
        model.model.norm.weight.fill_(NORM_CENTRE[family] + 19)  # logits spread about +-25
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def source(request, tokenizer, tmp_path_factory):
    """A tiny folder of the family with unit-gain blocks (as tests/test_export_gguf.py explains),
    every norm weight away from its neutral value so that each one matters, and its transformers model."""
    from transformers import AutoModelForCausalLM

    family = request.param
    torch.manual_seed(7)
    model = _unit_gain(AutoModelForCausalLM.from_config(CONFIGS[family](len(tokenizer)), dtype=torch.float32), family)
    # not named after the family: llama.cpp treats a GGUF whose name says "phi3" as Phi-3's own
    # tokenizer, which this test's tokenizer is not
    path = tmp_path_factory.mktemp("source")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, family


@pytest.fixture(scope="module")
def ckpt(source, data_dir, tmp_path_factory) -> Checkpoint:
    out = tmp_path_factory.mktemp("nested") / f"{source[2]}.elastiq"
    return Checkpoint(compress(source[0], out, CompressOptions(rates=RATES, calib_samples=4, calib_seqlen=32),
                               data=data_dir, progress=False))


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(TEXT)])


def _runtime(ckpt: Checkpoint, rate: float) -> Transformer:
    return Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)


def test_offered_groups_and_every_rate_is_the_masked_model(ckpt, source, ids, capsys):
    from elastiq.cli import main
    from elastiq.families import GROUP_KINDS

    family = source[2]
    assert {g.kind for g in ckpt.groups} == OFFERS[family]
    assert main(["inspect", str(ckpt.path)]) == 0
    out = capsys.readouterr().out
    if family in KEPT:
        assert (f"pruned: MLP channels, V/O rank per KV head (every q/k channel is kept: {KEPT[family]} normalises q "
                "and k per head before RoPE)") in out
    else:
        assert "pruned: " + ", ".join(GROUP_KINDS[k] for k in sorted(OFFERS[family])) + "\n" in out
    config = ckpt.config
    with torch.no_grad():
        full = _runtime(ckpt, 0.0)(ids)
        assert (full - source[1](ids).logits).abs().max() < 1e-4 * full.abs().max()  # sorting keeps the function
        for rate in RATES:
            sliced = _runtime(ckpt, rate)(ids)
            masked = Transformer.from_weights(masked_weights(ckpt.read_rate(0.0), ckpt, rate), config)(ids)
            assert (sliced - masked).abs().max() < 1e-4 * masked.abs().max()
            assert (sliced - full).abs().max() > 0.05 * full.abs().max()  # the rate did prune something
    widths = ckpt.rate_entry(0.375)["widths"]
    # K keeps every channel where q/k is not pruned, V its kept rank; 2 KV heads, 2 bytes each
    k = [2 * widths[f"layers.{i}.qk"] if QK in OFFERS[family] else 64 for i in range(config["num_hidden_layers"])]
    assert ckpt.rate_entry(0.375)["kv_bytes_per_token"] == sum(
        2 * (k[i] + widths[f"layers.{i}.vo"]) for i in range(config["num_hidden_layers"])) * 2


def test_cached_decoding_equals_transformers(ckpt, source, ids):
    from elastiq.runtime.generate import Generator

    hf = source[1].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    stats = Generator(_runtime(ckpt, 0.0), 128).generate(ids[0].tolist(), 16)
    assert stats.tokens == hf


def test_the_engine_switches_rate_in_memory(ckpt, ids):
    from elastiq.runtime.engine import Engine

    engine = Engine(ckpt.path, 0.0, ctx=128)
    for rate in (0.375, 0.125, 0.0):
        engine.set_rate(rate)
        assert torch.equal(engine.logits(ids), Engine(ckpt.path, rate, ctx=128).logits(ids))  # bit for bit a fresh load
        with torch.no_grad():
            expected = _runtime(ckpt, rate)(ids)
        # the engine holds pruned input axes in unit order: the same terms, summed in another order
        torch.testing.assert_close(engine.logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_onnx_export_equals_the_runtime(ckpt, ids, tmp_path):
    import onnxruntime as ort

    from elastiq.exporters.onnx import write_onnx

    path = write_onnx(ckpt.path, 0.375, tmp_path / "q.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(ids.shape[1])[None]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    logits = torch.from_numpy(session.run(["logits"], feeds)[0])
    with torch.no_grad():
        expected = _runtime(ckpt, 0.375)(ids)
    assert (logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_hf_export_is_a_stock_model_of_the_family(ckpt, source, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from elastiq.exporters.hf import write_hf

    model = AutoModelForCausalLM.from_pretrained(write_hf(ckpt.path, 0.375, tmp_path / "hf"), dtype=torch.float32)
    assert type(model).__name__ == HF_EXPORT[source[2]]
    with torch.no_grad():
        expected = _runtime(ckpt, 0.375)(ids)
        assert (model(ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()


def _llama_cpp_and_runtime(path, ckpt: Checkpoint, rate: float, ids: torch.Tensor):
    """(ids, llama.cpp's logits of the GGUF at ``path``, the runtime's of ``rate``), on as many of
    ``ids`` as the file's context holds (a file whose architecture has no sliding window, Phi-3 as
    llama, claims only the window's)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False, seed=0)
    ids = ids[:, :llm._model.n_ctx_train()]
    llm.eval(ids[0].tolist())
    model = _runtime(ckpt, rate)
    if model.args.hidden_act == "gelu_pytorch_tanh":
        # ggml's GELU on the CPU looks its input up in an fp16 table: with that rounding in the
        # runtime, Gemma 3 agrees to 2.5e-4-2.9e-4 of the largest logit (9e-4-1.2e-3 without it);
        # Qwen3 (SiLU) to 3e-6
        for block in model.layers:
            block.act = lambda x: torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    with torch.no_grad():
        return ids, torch.from_numpy(np.asarray(llm.scores[:ids.shape[1]])), model(ids)[0]


@pytest.mark.parametrize("rate", [0.0, 0.375])
def test_gguf_export_runs_in_llama_cpp_as_in_the_runtime(ckpt, ids, rate, tmp_path):
    """llama.cpp's own architecture of the family (MLP padded to the widest block); rate 0's file
    is also a source that elastiq reads back (transformers' GGUF loader) into the same model."""
    from elastiq.compressor.intake import load_model
    from elastiq.exporters.gguf import write_gguf

    path = write_gguf(ckpt.path, rate, tmp_path / "q.gguf", float_type="f32")
    ids, logits, expected = _llama_cpp_and_runtime(path, ckpt, rate, ids)
    assert (logits - expected).abs().max() < 1e-3 * expected.abs().max()
    if rate == 0:
        loaded = load_model(path)
        assert loaded.model_type in family_for(ckpt.config).model_types
        with torch.no_grad():
            assert (loaded.model(ids).logits[0] - expected).abs().max() < 1e-3 * expected.abs().max()


def test_rotation_is_refused_where_a_norm_follows_the_writers(source, data_dir, tmp_path):
    from elastiq import ElastiqError

    if source[2] != "gemma3":
        pytest.skip("this family's residual stream rotates (tests/test_rotate.py covers the plain block)")
    with pytest.raises(ElastiqError, match="gemma3 models cannot be rotated .*compress without --rotate"):
        compress(source[0], tmp_path / "r.elastiq", CompressOptions(rates=RATES, calib_samples=2, calib_seqlen=16,
                                                                      rotate=True), data=data_dir, progress=False)


def test_gptq_quantized_checkpoint_runs_packed_in_the_engine(ckpt, ids, data_dir, tmp_path):
    """GPTQ through the family's blocks, then the engine's packed int4 model (bf16 activations)
    against the same codes dequantized to float32, before and after a switch of rate."""
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint
    from elastiq.runtime.engine import Engine

    q = Checkpoint(quantize_checkpoint(ckpt.path, tmp_path / "q4.elastiq",
                                       QuantizeOptions(calib_samples=4, calib_seqlen=32, quality_windows=0),
                                       data=data_dir, progress=False))
    engine = Engine(q.path, 0.0, ctx=128)
    for rate in (0.0, 0.375):
        engine.set_rate(rate)
        got = engine.logits(ids)
        with torch.no_grad():
            want = _runtime(q, rate)(ids)
        # bf16 activations carry 8 significant bits through the blocks: a few percent of the logit scale
        assert (got - want).abs().max() < 0.05 * want.abs().max(), rate
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_elastiq_run_answers_from_a_qwen3_gguf(tokenizer, data_dir, tmp_path, monkeypatch, capsys):
    """A Qwen3 GGUF as a user brings one: ``elastiq run FILE.gguf`` compresses it at the default
    rates on first use (an MLP wide enough for their granularity), quantizes it and answers."""
    from transformers import AutoModelForCausalLM

    from elastiq.cli import main
    config = _qwen3(len(tokenizer))
    config.intermediate_size = 1024
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _, gguf = dense_gguf(model, tokenizer, tmp_path, data_dir)
    monkeypatch.setenv("ELASTIQ_CACHE", str(tmp_path / "cache"))
    assert main(["run", str(gguf), "--prompt", "The capital of France is", "--max-new-tokens", "6", "--ctx", "128",
                 "--max-kl", "inf"]) == 0
    out, err = capsys.readouterr()
    assert "compressing it once" in err and out.strip()
    (cached,) = (tmp_path / "cache" / "checkpoints").glob("*-q4.elastiq")
    assert Checkpoint(cached).rates == [0.0, 0.15, 0.25, 0.35]


def test_a_phi3_gguf_reads_as_its_model(tokenizer, data_dir, tmp_path):
    """A Phi-3 GGUF as llama.cpp's converter lays it out (fused ``attn_qkv``, gate and up fused in
    ``ffn_up``), written here with gguf-py from a tiny Phi-3: intake reads it (transformers' GGUF
    reader) and unfuses it into the Mistral model, whose logits are the Phi-3 model's."""
    import gguf
    from transformers import AutoModelForCausalLM

    from elastiq.compressor.intake import load_model
    from elastiq.exporters.gguf import add_vocab

    config = _phi3(len(tokenizer))
    config.sliding_window = None  # a GGUF of Phi-3 carries no window
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    vocab_source = Checkpoint(compress(tmp_path / "hf", tmp_path / "v.elastiq", CompressOptions(
        rates=(), calib_samples=2, calib_seqlen=16, quality_windows=0), data=data_dir, progress=False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, config.num_hidden_layers)
    writer = gguf.GGUFWriter(tmp_path / "phi3.gguf", "phi3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_vocab(writer, vocab_source, config.vocab_size)
    for name, t in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded = load_model(tmp_path / "phi3.gguf")
    assert loaded.model_type == "phi3" and loaded.model.config.model_type == "mistral"
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected = model(ids).logits
        assert (loaded.model(ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()


def test_a_gemma3_folder_with_vision_reads_as_its_text_model(tokenizer, tmp_path):
    """The 4B and larger Gemma 3 releases are ``Gemma3ForConditionalGeneration`` folders: intake
    keeps the language model and head (shared, not copied), whose logits on text are the model's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from elastiq.compressor.intake import load_model

    text = _gemma3(len(tokenizer) + 3)  # three more ids: the image tokens
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=len(tokenizer),
                          eoi_token_index=len(tokenizer) + 1, image_token_index=len(tokenizer) + 2)
    torch.manual_seed(5)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.model_type == "gemma3" and type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.model.config.model_type == "gemma3_text"
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(input_ids=ids).logits)


def test_gemma3_global_layers_linear_rope_scaling_reaches_llama_cpp(tokenizer, data_dir, tmp_path, ids):
    """Gemma 3 4B and larger scale their global layers' RoPE linearly (factor 8) and not the
    sliding ones': the GGUF says so as llama.cpp's converter does, and llama.cpp agrees."""
    from transformers import AutoModelForCausalLM

    config = _gemma3(len(tokenizer))
    config.rope_parameters["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    model = _unit_gain(AutoModelForCausalLM.from_config(config, dtype=torch.float32), "gemma3", seed=6)
    ckpt, path = dense_gguf(model, tokenizer, tmp_path, data_dir)
    ckpt = Checkpoint(ckpt)
    ids, logits, expected = _llama_cpp_and_runtime(path, ckpt, 0.0, ids)
    unscaled = {**ckpt.config, "rope_parameters": {**ckpt.config["rope_parameters"],
                                                   "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    with torch.no_grad():
        runtime = _runtime(ckpt, 0.0)(ids)[0]
        assert (runtime - model(ids).logits[0]).abs().max() < 1e-4 * runtime.abs().max()  # the runtime is exact
        without = Transformer.from_weights(ckpt.read_rate(0.0), unscaled)(ids)[0]
    assert (without - runtime).abs().max() > 0.02 * runtime.abs().max()  # the scaling matters here
    assert (logits - expected).abs().max() < 1e-3 * expected.abs().max()


def test_a_longrope_context_stops_where_the_runtime_is_exact():
    """Phi-3's 128k releases change their RoPE frequencies past ``original_max_position_embeddings``;
    the runtime keeps the short ones, so a longer context is refused, saying why."""
    from elastiq import ElastiqError
    from elastiq.runtime.engine import check_ctx

    config = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}
    check_ctx(config, 4096)
    with pytest.raises(ElastiqError, match=r"--ctx 8192 is outside .* 2 to 4096 positions \(original_max_position"):
        check_ctx(config, 8192)
    check_ctx({**config, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, 8192)


def test_a_family_without_the_partial_rope_layout_refuses_partial_rope(tokenizer):
    """Only a family whose intake lays heads out for whole-head RoPE (Bamba's) takes partial RoPE;
    another one says what it runs instead of computing a wrong model."""
    from elastiq import ElastiqError
    from elastiq.families import config_dict

    config = config_dict(tiny_config("llama", len(tokenizer)))
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.5}
    with pytest.raises(ElastiqError, match=r"partial_rotary_factor 0.5\); elastiq runs llama models whose RoPE "
                                           r"turns whole heads"):
        family_for(config).check(config)

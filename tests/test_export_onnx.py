"""ONNX export: onnxruntime's logits equal the elastic runtime's at every rate, prefill and cached
decode; 4-bit matrices are MatMulNBits on the checkpoint's own codes; bad input fails cleanly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from elastiq.checkpoint import Checkpoint, CheckpointError
from elastiq.exporters.onnx import OnnxExportError, build_model, write_onnx
from elastiq.quants import Q8Tensor, QuantizedTensor, matmulnbits, matmulnbits_q8
from elastiq.modeling.model import Transformer, runtime_weights
from conftest import TEXT

RATES = (0.15, 0.35)
TOLERANCE = 1e-5  # max abs logit difference (measured: 3.3e-7); the tiny models' logits are of order 1


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}


def _step(session, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
    """One onnxruntime call: logits and the presents renamed as the next call's past."""
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **cache})
    presents = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}
    return outs[0], presents


def _runtime_logits(ckpt: Checkpoint, rate: float, ids: torch.Tensor) -> np.ndarray:
    model = Transformer.from_weights(ckpt.read_rate(rate), ckpt.config)
    with torch.no_grad():
        return model(ids).numpy()


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-q4", "qwen2-q4", "llama-q8", "qwen2-q8"])
def test_prefill_and_cached_decode_equal_the_runtime_at_every_rate(name, nested_checkpoints, tokenizer, tmp_path):
    ckpt = nested_checkpoints[name]
    ids = np.array([tokenizer.encode(TEXT)], dtype=np.int64)
    T = ids.shape[1]
    assert ckpt.rates == [0.0, *RATES]
    for rate in ckpt.rates:
        expected = _runtime_logits(ckpt, rate, torch.from_numpy(ids))
        session = _session(write_onnx(ckpt.path, rate, tmp_path / f"{rate}.onnx"))
        positions = np.arange(T, dtype=np.int64)[None]
        prefill, cache = _step(session, ids[:, :-1], np.ones((1, T - 1), np.int64), positions[:, :-1],
                               _empty_cache(session, 1))
        decode, cache = _step(session, ids[:, -1:], np.ones((1, T), np.int64), positions[:, -1:], cache)
        assert np.abs(prefill - expected[:, :-1]).max() < TOLERANCE, (name, rate)
        assert np.abs(decode - expected[:, -1:]).max() < TOLERANCE, (name, rate)
        assert cache["past_key_values.0.key"].shape[2] == T


def test_batch_with_left_padding_equals_each_sequence_alone(nested_checkpoints, tokenizer, tmp_path):
    ckpt = nested_checkpoints["qwen2-q4"]
    long, short = tokenizer.encode(TEXT)[:12], tokenizer.encode(TEXT)[12:20]
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short], dtype=np.int64)
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)], dtype=np.int64)
    positions = np.array([list(range(len(long))), [0] * pad + list(range(len(short)))], dtype=np.int64)
    session = _session(write_onnx(ckpt.path, 0.35, tmp_path / "m.onnx"))
    logits, _ = _step(session, ids, mask, positions, _empty_cache(session, 2))
    for row, seq, start in ((0, long, 0), (1, short, pad)):
        expected = _runtime_logits(ckpt, 0.35, torch.tensor([seq]))[0]
        assert np.abs(logits[row, start:] - expected).max() < TOLERANCE, row


def test_cache_shapes_follow_each_layers_widths(nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints["llama"]
    session = _session(write_onnx(ckpt.path, 0.35, tmp_path / "m.onnx"))
    weights, G = ckpt.read_rate(0.35), ckpt.heads.num_kv_heads
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(outputs)[0] == "logits"
    for i in range(2):
        k_rows = weights[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0]
        v_rows = weights[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0]
        assert inputs[f"past_key_values.{i}.key"] == ["batch_size", G, "past_sequence_length", k_rows // G]
        assert inputs[f"past_key_values.{i}.value"] == ["batch_size", G, "past_sequence_length", v_rows // G]
        assert outputs[f"present.{i}.value"] == ["batch_size", G, "total_sequence_length", v_rows // G]


def test_matmulnbits_weights_are_the_checkpoints_codes(nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints["qwen2-q4"]
    model = onnx.load(write_onnx(ckpt.path, 0.15, tmp_path / "m.onnx"))
    weights = runtime_weights(ckpt.read_rate(0.15), ckpt.config)  # the initializers' names
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    quantized = {k: v for k, v in weights.items() if isinstance(v, (QuantizedTensor, Q8Tensor))}
    assert len(matmuls) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer, and the LM head
    for node in matmuls:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "com.microsoft" and len(node.input) == 3  # no zero points: the defaults
        t = quantized[node.input[1].removesuffix(".matmulnbits")]
        eight = isinstance(t, Q8Tensor)
        assert eight == (".attn_v." in node.input[1])  # the value projections are Q8_0 by default
        assert attrs == {"K": t.shape[1], "N": t.shape[0], "bits": 8 if eight else 4, "block_size": 32}
        assert inits[node.input[1]].tobytes() == (matmulnbits_q8 if eight else matmulnbits)(t.codes).numpy().tobytes()
        assert np.array_equal(inits[node.input[2]], t.scales.float().numpy())
        assert inits[node.input[2]].dtype == np.float32
    (gather,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert gather.input[0] == "embed_tokens.weight.matmulnbits"  # one B for the tied embedding and head
    assert not [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits]


@pytest.mark.parametrize("name", ["llama-q8", "qwen2-q8"])
def test_8bit_embedding_and_head_are_the_checkpoints_codes_plus_128(name, nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints[name]
    model = onnx.load(write_onnx(ckpt.path, 0.35, tmp_path / "m.onnx"))
    weights = ckpt.read_rate(0.35)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (gather,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(
        ("embed_tokens", "lm_head"))]
    assert len(head) == 1 and head[0].input[1] == ("embed_tokens.weight.matmulnbits" if name == "llama-q8"
                                                   else "lm_head.weight.matmulnbits")
    for node, hf in ((gather, "model.embed_tokens.weight"), (head[0], "lm_head.weight")):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 8 and len(node.input) == 3  # no zero points: the default 128
        t = weights[hf]
        b = node.input[0] if node is gather else node.input[1]
        assert np.array_equal(inits[b].astype(np.int16) - 128, t.codes.numpy())


def test_bad_inputs_fail_clearly_and_leave_no_file(nested_checkpoints, tmp_path):
    ckpt = nested_checkpoints["llama"]
    with pytest.raises(CheckpointError, match=r"rate 0.2 is not offered by llama.elastiq; offered: 0.0, 0.15, 0.35"):
        write_onnx(ckpt.path, 0.2, tmp_path / "m.onnx")
    with pytest.raises(OnnxExportError, match="file name must end in .onnx, got m.gguf"):
        write_onnx(ckpt.path, 0.15, tmp_path / "m.gguf")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(OnnxExportError, match="d.onnx is a directory; give the path of an .onnx file"):
        write_onnx(ckpt.path, 0.15, tmp_path / "d.onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(OnnxExportError, match=r"cannot write .*file/m.onnx: "):
        write_onnx(ckpt.path, 0.15, tmp_path / "file" / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "file"]

    weights, config = ckpt.read_rate(0.15), dict(ckpt.config)
    with pytest.raises(OnnxExportError, match="RoPE type 'dynamic' is not supported .* supported: default, linear"):
        build_model(weights, {**config, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}})

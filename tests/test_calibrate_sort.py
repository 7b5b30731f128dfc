"""Calibration statistics against direct computation; sorting orders and keeps the function."""

from __future__ import annotations

import pytest
import torch

from elastiq import ElastiqError
from elastiq.checkpoint import MLP, QK, VO, Heads
from elastiq.layouts import to_storage
from elastiq.families import family_for
from elastiq.compressor.calibrate import C4_SAMPLE, calibrate, calibration_samples, calibration_texts
from elastiq.compressor.sort import pair_scores, ridge_leverage, sort_block
from conftest import build_tiny


def test_samples_are_deterministic_windows_of_c4(tokenizer, data_dir):
    a = calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32, seed=1)
    assert a.shape == (4, 32) and torch.equal(a, calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32, seed=1))
    assert not torch.equal(a, calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32, seed=2))
    with pytest.raises(ElastiqError, match="holds only 0 windows of 10000000 tokens outside its held-out documents "
                                           r"\(2000 documents\); 1 are needed to calibrate"):
        calibration_samples(tokenizer, data_dir / C4_SAMPLE, 1, 10_000_000)


PARAGRAPHS = ["The first paragraph is about calibration and the text that feeds it.",
              "A second one, a little longer, says that short documents are joined end to end.",
              "The third paragraph closes the file."]


def _write_calibration(path, paragraphs):
    """The same documents as a text file, JSON lines or parquet, by ``path``'s suffix."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".txt":
        path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs)))
    else:
        pq.write_table(pa.table({"text": paragraphs, "source": ["user"] * len(paragraphs)}), path)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_own_calibration_text_in_each_format(suffix, tokenizer, tmp_path):
    path = _write_calibration(tmp_path / f"mine{suffix}", PARAGRAPHS)
    assert calibration_texts(path) == PARAGRAPHS
    # Every paragraph is shorter than a window, so the windows are cut from the joined paragraphs.
    seqlen = max(len(tokenizer.encode(p)) for p in PARAGRAPHS)
    joined = tokenizer.encode("\n\n".join(PARAGRAPHS))
    windows = [joined[i:i + seqlen] for i in range(0, len(joined) - seqlen + 1, seqlen)]
    assert len(windows) >= 2
    samples = calibration_samples(tokenizer, path, 2, seqlen, seed=0)
    assert samples.shape == (2, seqlen) and all(row in windows for row in samples.tolist())
    with pytest.raises(ElastiqError, match=f"mine{suffix} holds only {len(windows)} windows of {seqlen} tokens "
                                           f"outside its held-out documents .3 documents.; 50 are needed to "
                                           "calibrate: lower --calib-seqlen"):
        calibration_samples(tokenizer, path, 50, seqlen)


def test_long_documents_give_one_window_each(tokenizer, tmp_path):
    long = " ".join(f"word{i}" for i in range(200))
    path = _write_calibration(tmp_path / "long.jsonl", [long, long.upper(), "short"])
    samples = calibration_samples(tokenizer, path, 2, 32, seed=3)
    ids = [tokenizer.encode(long), tokenizer.encode(long.upper())]
    found = sorted(next(d for d, doc in enumerate(ids) if any(doc[i:i + 32] == row for i in range(len(doc))))
                   for row in samples.tolist())
    assert found == [0, 1]


def test_held_out_windows_come_from_reserved_documents_only(tokenizer, tmp_path):
    """Every 10th document feeds the held-out windows and nothing else, for any window count:
    the quality recorded at the end of compression is on text no training step saw."""
    docs = [" ".join(f"doc{d}word{i}" for i in range(60)) for d in range(30)]
    path = _write_calibration(tmp_path / "docs.jsonl", docs)
    ids = [tokenizer.encode(d) for d in docs]

    def source(row):
        return next(d for d, doc in enumerate(ids) if any(doc[i:i + 16] == row for i in range(len(doc))))

    drawn = calibration_samples(tokenizer, path, 20, 16, seed=0, heldout=3)
    assert sorted(source(r) for r in drawn[20:].tolist()) == [9, 19, 29]
    assert all(source(r) % 10 != 9 for r in drawn[:20].tolist())
    assert torch.equal(drawn[:20], calibration_samples(tokenizer, path, 20, 16, seed=0))
    with pytest.raises(ElastiqError, match=r"only 3 windows of 16 tokens in its held-out documents \(every 10th of "
                                           r"30\); 4 are needed to measure each rate: lower --quality-windows"):
        calibration_samples(tokenizer, path, 20, 16, seed=0, heldout=4)


@pytest.mark.parametrize("name, content, message", [
    ("data.csv", "text\nhello\n", r"must be plain text \(.txt, .md\), JSON lines .* got a .csv file"),
    ("data.txt", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("data.txt", "\n\n  \n", "holds no text"),
    ("data.jsonl", '{"text": "fine"}\nnot json\n', r"line 2: not a JSON object"),
    ("data.jsonl", '{"body": "no text field"}\n', r"line 1: no \"text\" string field"),
    ("data.parquet", "not parquet at all", "is not a readable parquet file"),
])
def test_bad_calibration_files_are_refused(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ElastiqError, match=message):
        calibration_texts(path)


def test_parquet_without_a_text_column_names_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "url": ["b"]}), tmp_path / "d.parquet")
    with pytest.raises(ElastiqError, match=r'no "text" column \(its columns: content, url\)'):
        calibration_texts(tmp_path / "d.parquet")
    with pytest.raises(ElastiqError, match="calibration data .*missing.parquet is missing"):
        calibration_texts(tmp_path / "missing.parquet")


def test_block_statistics_match_direct_computation(tokenizer, data_dir):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_tiny("llama", tokenizer)
    family = family_for(model.config.to_dict())
    samples = calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32)
    stats = dict(calibrate(model, family, samples, chunk=3, progress=False))  # chunks of 3 and 1
    block, h = model.model.layers[0], family.heads(model.config.to_dict())
    with torch.no_grad():
        hidden = model(samples, output_hidden_states=True).hidden_states
        x = block.input_layernorm(hidden[0])
        q = block.self_attn.q_proj(x).unflatten(-1, (h.num_heads, h.head_dim)).transpose(1, 2)
        k = block.self_attn.k_proj(x).unflatten(-1, (h.num_kv_heads, h.head_dim)).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(32)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mid = hidden[0] + block.self_attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]
        m = block.post_attention_layernorm(mid)
        act = torch.nn.functional.silu(block.mlp.gate_proj(m)) * block.mlp.up_proj(m)
    s = stats[0]
    assert s.tokens == 128
    flat = x.reshape(-1, x.shape[-1]).double()
    assert torch.allclose(s.attn, flat.T @ flat, rtol=1e-4, atol=1e-4)
    assert torch.allclose(s.q_sq, q.double().square().sum((0, 2)), rtol=1e-4)
    assert torch.allclose(s.k_sq, k.double().square().sum((0, 2)), rtol=1e-4)
    a = act.reshape(-1, act.shape[-1]).double()
    assert torch.allclose(s.mlp, a.T @ a, rtol=1e-3, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)
    assert s.influence == pytest.approx((1 - cosine).mean().item(), rel=1e-4)


def test_ridge_leverage_on_a_known_spectrum():
    lam = 5 / 3  # ridge 1 x mean eigenvalue of diag(4, 1, 0)
    got = ridge_leverage(torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)))
    assert got.tolist() == pytest.approx([4 / (4 + lam), 1 / (1 + lam), 0.0])


def test_pair_scores_sum_both_channels_over_query_heads():
    heads = Heads(num_heads=2, num_kv_heads=1, head_dim=4)
    q_sq = torch.tensor([[1.0, 4.0, 9.0, 16.0], [1.0, 1.0, 1.0, 1.0]])
    k_sq = torch.tensor([[4.0, 1.0, 1.0, 4.0]])
    # channel scores sqrt(q)*sqrt(k): head 0 [2, 2, 3, 8], head 1 [2, 1, 1, 2]; pairs (0,2), (1,3)
    assert pair_scores(q_sq, k_sq, heads).tolist() == [[2 + 3 + 2 + 1, 2 + 8 + 1 + 2]]


@pytest.mark.parametrize("method", ["uniql", "magnitude"])
def test_mlp_and_vo_sorting_keep_the_function(method, tokenizer, data_dir):
    """Without Q/K (whose pair permutation needs the RoPE gather), transformers itself checks it."""
    model = build_tiny("qwen2", tokenizer)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    config = model.config.to_dict()
    family = family_for(config)
    ids = torch.tensor([tokenizer.encode("Robert Boulter is an English film , television and theatre actor .")])
    with torch.no_grad():
        before = model(ids).logits
    samples = calibration_samples(tokenizer, data_dir / C4_SAMPLE, 4, 32)
    for i, stats in calibrate(model, family, samples, progress=False):
        sort_block(model, [g for g in family.groups(config, i) if g.kind in (MLP, VO)], family.heads(config), stats,
                   method)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() < 1e-4


def test_magnitude_orders_units_by_norm(tokenizer, data_dir):
    model = build_tiny("llama", tokenizer)
    config = model.config.to_dict()
    family, heads = family_for(config), family_for(config).heads(config)
    stats = next(calibrate(model, family, calibration_samples(tokenizer, data_dir / C4_SAMPLE, 2, 16),
                           progress=False))[1]
    pairs = sort_block(model, family.groups(config, 0), heads, stats, "magnitude")
    state = model.state_dict()
    norms = sum(to_storage(state[f"model.layers.0.mlp.{n}"], r, heads).square().sum(1)
                for n, r in (("gate_proj.weight", "rows"), ("up_proj.weight", "rows"), ("down_proj.weight", "cols")))
    assert torch.all(norms[:-1] >= norms[1:])
    assert pairs.dtype == torch.int32 and sorted(pairs[0].tolist()) == list(range(32))


def test_uniql_orders_pairs_by_score(tokenizer, data_dir):
    model = build_tiny("llama", tokenizer)
    config = model.config.to_dict()
    family, heads = family_for(config), family_for(config).heads(config)
    stats = next(calibrate(model, family, calibration_samples(tokenizer, data_dir / C4_SAMPLE, 2, 16),
                           progress=False))[1]
    pairs = sort_block(model, [g for g in family.groups(config, 0) if g.kind == QK], heads, stats)
    scores = pair_scores(stats.q_sq, stats.k_sq, heads)
    kept = scores.gather(1, pairs.long())
    assert torch.all(kept[:, :-1] >= kept[:, 1:])


def test_unknown_method(tiny_llama):
    config = tiny_llama.config.to_dict()
    family = family_for(config)
    with pytest.raises(ElastiqError, match="unknown sorting method 'random'; known: uniql, magnitude"):
        sort_block(tiny_llama, family.groups(config, 0), family.heads(config), None, "random")

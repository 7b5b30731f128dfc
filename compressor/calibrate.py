"""Calibration: stream C4 text through the model one block at a time and collect what sorting needs.

The GPTQ-style sequential pass: the inputs of block 0 are captured once, then each block runs
over all samples with hooks that accumulate its statistics, and its outputs become the next
block's inputs. Peak memory holds one block's activations (samples x seqlen x hidden, twice)
plus one block's statistics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .. import ElastiqError
from .adapters import ModelAdapter

C4_SAMPLE = Path("c4") / "c4_validation_2k.parquet"


@dataclass
class BlockStats:
    """Sums over every calibration token of one block (divide by ``tokens`` for means).

    ``mlp``: X^T X of the down projection's input [I, I]; ``attn``: X^T X of the attention's
    (normed) input [hidden, hidden]; ``q_sq`` / ``k_sq``: post-RoPE energy of every query / key
    channel [H, d] / [G, d]; ``influence``: mean over tokens of 1 - cos(block input, block output).
    """

    mlp: torch.Tensor
    attn: torch.Tensor
    q_sq: torch.Tensor
    k_sq: torch.Tensor
    influence: float
    tokens: int


def calibration_samples(tokenizer, data: Path, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens, each from a random C4 document long enough to hold one
    (the GPTQ convention), at a random offset; deterministic for a seed."""
    import pyarrow.parquet as pq

    path = data / C4_SAMPLE
    if not path.is_file():
        raise ElastiqError(f"calibration data {path} is missing")
    if n <= 0 or seqlen <= 1:
        raise ElastiqError(f"--calib-samples ({n}) must be positive and --calib-seqlen ({seqlen}) at least 2")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    samples = []
    for k in order:
        ids = tokenizer.encode(texts[k])
        if len(ids) > seqlen:
            start = rng.randrange(len(ids) - seqlen)
            samples.append(ids[start:start + seqlen])
            if len(samples) == n:
                return torch.tensor(samples)
    raise ElastiqError(f"only {len(samples)} of the {len(texts)} C4 documents hold {seqlen} tokens; "
                       f"lower --calib-seqlen or --calib-samples")


class _Captured(Exception):
    """Raised by the hook on block 0 once it has seen its inputs."""


def _block_inputs(adapter: ModelAdapter, samples: torch.Tensor, chunk: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0, and the keyword arguments the model passes to every block
    (rotary tables, causal mask), one per chunk of samples."""
    hidden, kwargs = [], []

    def catch(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = adapter.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(samples), chunk):
            try:
                adapter.model(input_ids=samples[start:start + chunk], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, d] with cos/sin [B or 1, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@torch.inference_mode()
def calibrate(adapter: ModelAdapter, samples: torch.Tensor, chunk: int = 4,
              progress: bool = True) -> Iterator[tuple[int, BlockStats]]:
    """Yield (block index, statistics) for every block in order, one block in memory at a time.

    The caller may change block i's weights when it receives its statistics, as long as the
    change keeps the block's function (as sorting does): the next block's inputs are already
    computed.
    """
    heads = adapter.heads
    hidden, kwargs = _block_inputs(adapter, samples, chunk)
    for index in tqdm(range(len(adapter.layers)), desc="calibrate", disable=not progress, leave=False):
        block = adapter.layers[index]
        attn, mlp = block.self_attn, block.mlp
        stats = BlockStats(
            mlp=torch.zeros(mlp.down_proj.in_features, mlp.down_proj.in_features, dtype=torch.float64),
            attn=torch.zeros(attn.q_proj.in_features, attn.q_proj.in_features, dtype=torch.float64),
            q_sq=torch.zeros(heads.num_heads, heads.head_dim, dtype=torch.float64),
            k_sq=torch.zeros(heads.num_kv_heads, heads.head_dim, dtype=torch.float64),
            influence=0.0, tokens=0)
        current: dict = {}

        def gram(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1, x.shape[-1]).float()
            return (x.T @ x).double()

        def on_down(module, args):
            stats.mlp += gram(args[0])

        def on_q(module, args, out):
            stats.attn += gram(args[0])
            q = _rotate(out.float().unflatten(-1, (heads.num_heads, heads.head_dim)), *current["rope"])
            stats.q_sq += q.square().sum((0, 1)).double()

        def on_k(module, args, out):
            k = _rotate(out.float().unflatten(-1, (heads.num_kv_heads, heads.head_dim)), *current["rope"])
            stats.k_sq += k.square().sum((0, 1)).double()

        handles = [mlp.down_proj.register_forward_pre_hook(on_down), attn.q_proj.register_forward_hook(on_q),
                   attn.k_proj.register_forward_hook(on_k)]
        influence_sum = 0.0
        try:
            for c, (x, kw) in enumerate(zip(hidden, kwargs)):
                cos, sin = kw["position_embeddings"]
                current["rope"] = (cos.float(), sin.float())
                out = block(x, **kw)
                out = out[0] if isinstance(out, tuple) else out
                influence_sum += (1 - torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1)).sum().item()
                stats.tokens += x.shape[0] * x.shape[1]
                hidden[c] = out
        finally:
            for h in handles:
                h.remove()
        stats.influence = influence_sum / stats.tokens
        yield index, stats

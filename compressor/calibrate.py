"""Calibration: stream text (the C4 sample by default) through the model one block at a time and
collect what sorting needs.

The GPTQ-style sequential pass: the inputs of block 0 are captured once, then each block runs
over all samples with hooks that accumulate its statistics, and its outputs become the next
block's inputs. Peak memory holds one block's activations (samples x seqlen x hidden, twice)
plus one block's statistics.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .. import ElastiqError
from ..checkpoint import QK
from ..families import config_dict
from ..families.base import (ATTENTION_KINDS, ATTN_K, ATTN_Q, EMBED, FFN_DOWN, FINAL_NORM, MLP_KINDS, SSM_IN_Z,
                             SSM_KINDS, Family)
from ..paths import data_dir
from .distributed import my_chunks, reduce_round, round_chunk, rounds, world

C4_SAMPLE = Path("c4") / "c4_validation_2k.parquet"


@dataclass
class BlockStats:
    """Sums over every calibration token of one block (divide by ``tokens`` for means).

    Of an attention block: ``mlp``, X^T X of the down projection's input [I, I]; ``attn``, X^T X
    of the attention's (normed) input [hidden, hidden]; ``q_sq`` / ``k_sq``, post-RoPE energy of
    every query / key channel [H, d] / [G, d]. Of an SSM block: ``ssm_input``, the (normed)
    hidden states entering its mixer [samples, T, hidden], from which UniQL's state-aware scores
    run the mixer's own scan. Of every block: ``influence``, mean over tokens of
    1 - cos(block input, block output).
    """

    influence: float
    tokens: int
    mlp: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    q_sq: torch.Tensor | None = None
    k_sq: torch.Tensor | None = None
    ssm_input: torch.Tensor | None = None


CALIB_FORMATS = ("plain text (.txt, .md), JSON lines with a \"text\" field (.jsonl) or parquet with a \"text\" "
                 "column (.parquet)")


def calibration_file(calib_data: Path | None, data: Path | None = None) -> Path:
    """The calibration file to read: the user's ``calib_data``, else the C4 sample of the data
    folder ``data`` (by default the data elastiq carries, or $ELASTIQ_DATA)."""
    return Path(calib_data).expanduser() if calib_data else (data or data_dir()) / C4_SAMPLE


def describe_calibration(path: Path, data: Path | None = None) -> dict:
    """What the manifest records of the calibration file: the packaged sample by its name in the
    data folder, a user's file by its name; the sha256 of its bytes either way."""
    default = (data or data_dir()) / C4_SAMPLE
    name = str(C4_SAMPLE) if path == default else path.name
    return {"file": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def calibration_texts(path: Path) -> list[str]:
    """The documents of a calibration file: a plain text file's blank-line-separated paragraphs,
    the ``text`` field of each JSON line, or the ``text`` column of a parquet file."""
    path = Path(path)
    if not path.is_file():
        raise ElastiqError(f"calibration data {path} is missing (expected a file: {CALIB_FORMATS})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".text", ".md"):
            texts = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        elif suffix in (".jsonl", ".json"):
            texts = []
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ElastiqError(f"{path}, line {number}: not a JSON object ({err.msg}); expected one "
                                           "object with a \"text\" field per line") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ElastiqError(f"{path}, line {number}: no \"text\" string field; expected one "
                                           "object with a \"text\" field per line")
                    texts.append(row["text"])
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                columns = pq.read_schema(path).names
            except pa.ArrowException as err:
                raise ElastiqError(f"{path} is not a readable parquet file ({err})") from None
            if "text" not in columns:
                raise ElastiqError(f"{path} has no \"text\" column (its columns: {', '.join(columns)})")
            texts = [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
        else:
            raise ElastiqError(f"{path}: calibration data must be {CALIB_FORMATS}; got a {suffix or 'suffix-less'} "
                               "file")
    except UnicodeDecodeError:
        raise ElastiqError(f"{path} is not UTF-8 text; calibration data must be {CALIB_FORMATS}") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ElastiqError(f"calibration data {path} holds no text")
    return texts


HELDOUT_EVERY = 10  # every 10th document of a calibration file is reserved for held-out windows


def calibration_samples(tokenizer, path: Path, n: int, seqlen: int, seed: int = 0, heldout: int = 0) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens from the calibration file ``path``, then ``heldout`` more
    (held out of calibration to measure quality); deterministic for a seed, and the first ``n``
    do not depend on ``heldout``.

    Held-out windows come only from the reserved documents (every ``HELDOUT_EVERY``-th in file
    order) and the others never do, whatever ``n``, ``seqlen`` and ``seed``: the quality measured
    at the end of compression is on text that neither calibration nor recovery trained on. Within
    each part, the GPTQ convention: each window comes from a random document long enough to hold
    one, at a random offset. When too few documents are that long (short chat turns, paragraphs
    of a text file), the rest are cut from the short documents joined in file order (by blank
    lines).
    """
    if n <= 0 or seqlen <= 1:
        raise ElastiqError(f"--calib-samples ({n}) must be positive and --calib-seqlen ({seqlen}) at least 2")
    texts = calibration_texts(path)
    train = [t for k, t in enumerate(texts) if k % HELDOUT_EVERY != HELDOUT_EVERY - 1 or len(texts) == 1]
    reserved = [t for k, t in enumerate(texts) if k % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    samples = _windows(tokenizer, train, n, seqlen, random.Random(seed))
    if len(samples) < n:
        raise ElastiqError(f"{path.name} holds only {len(samples)} windows of {seqlen} tokens outside its held-out "
                           f"documents ({len(texts)} documents); {n} are needed to calibrate: lower "
                           "--calib-seqlen or --calib-samples, or give more text")
    if heldout:
        held = _windows(tokenizer, reserved, heldout, seqlen, random.Random(seed + 1))
        if len(held) < heldout:
            raise ElastiqError(f"{path.name} holds only {len(held)} windows of {seqlen} tokens in its held-out "
                               f"documents (every {HELDOUT_EVERY}th of {len(texts)}); {heldout} are needed to "
                               "measure each rate: lower --quality-windows (0 measures nothing) or --calib-seqlen, "
                               "or give more text")
        samples += held
    return torch.tensor(samples)


def heldout_windows(tokenizer, path: Path, count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The ``count`` held-out windows that ``calibration_samples`` appends for ``seed``, alone."""
    return calibration_samples(tokenizer, path, 1, seqlen, seed, heldout=count)[1:]


def _windows(tokenizer, texts: list[str], n: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    """Up to ``n`` windows of ``seqlen`` tokens from ``texts`` (see ``calibration_samples``)."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    samples, short = [], []
    for k in order:
        ids = tokenizer.encode(texts[k])
        if len(ids) > seqlen:
            start = rng.randrange(len(ids) - seqlen)
            samples.append(ids[start:start + seqlen])
            if len(samples) == n:
                return samples
        else:
            short.append(k)
    joined = tokenizer.encode("\n\n".join(texts[k] for k in sorted(short))) if short else []  # in file order
    windows = [joined[i:i + seqlen] for i in range(0, len(joined) - seqlen + 1, seqlen)]
    rng.shuffle(windows)
    return samples + windows[:n - len(samples)]


class _Captured(Exception):
    """Raised by the hook on the final norm once every block has seen its arguments."""


def _block_inputs(model: torch.nn.Module, family: Family, samples: torch.Tensor, chunk: int,
                  device: torch.device) -> tuple[dict[int, torch.Tensor], dict[int, list[dict]]]:
    """Hidden states entering block 0, and for each chunk of samples the keyword arguments the
    model passes to each block (rotary tables and masks, which differ between blocks of different
    layer types, as Gemma 3's sliding and global ones), by chunk index, for the chunks this rank
    runs. While they are read, every block passes its input through unchanged, and the pass stops
    at the final norm, so it costs little. The samples go to ``device``, the embedding's."""
    blocks = family.blocks(model)
    hidden, kwargs, current = {}, {}, [0]

    def recorder(index: int):
        def forward(*args, **kw):
            x = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                hidden[current[0]] = x
                kwargs[current[0]] = []
            kwargs[current[0]].append({k: v for k, v in kw.items() if k != "hidden_states"})
            return (x, None) if family.returns_pair else x
        return forward

    def stop(module, args):
        raise _Captured

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    handle = family.top_module(model, FINAL_NORM).register_forward_pre_hook(stop)
    try:
        for c in my_chunks(-(-len(samples) // chunk)):
            current[0] = c
            try:
                model(input_ids=samples[c * chunk:(c + 1) * chunk].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        for block in blocks:
            del block.forward  # back to the class's forward
    return hidden, kwargs


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, d] with cos/sin [B or 1, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@torch.inference_mode()
def calibrate(model: torch.nn.Module, family: Family, samples: torch.Tensor, chunk: int = 4,
              progress: bool = True, load: Callable[[int], None] | None = None, start: int = 0,
              activations: dict[int, torch.Tensor] | None = None) -> Iterator[tuple[int, BlockStats | None]]:
    """Yield (block index, statistics) for every block in order from ``start``, one block in
    memory at a time.

    On ranks other than 0 of a distributed run the statistics are None: rank 0 sorts. The
    caller may change block i's weights when it receives its statistics, as long as the
    change keeps the block's function (as sorting does): the next block's inputs are already
    computed. ``load(i)``, if given, is called before block i runs (a streamed model fills it
    then); the embeddings must be loaded before. ``activations`` holds this rank's hidden states
    by chunk, entering block ``start`` (those a stopped run saved; filled here at block 0) and
    leaving each block once it is yielded, for the caller to save. Everything runs on the device
    of the embedding and of each block as ``load`` leaves it; the statistics come on that device.
    """
    config = config_dict(model.config)
    heads, kinds = family.heads(config), family.layer_kinds(config)
    blocks = family.blocks(model)
    device = family.top_module(model, EMBED).weight.device
    hidden, kwargs = _block_inputs(model, family, samples, chunk, device)
    if activations is not None:
        if start == 0:
            activations.update(hidden)
        for c, x in activations.items():  # a stopped run's, read back on the CPU
            activations[c] = x.to(device)
        hidden = activations
    count, size = -(-len(samples) // chunk), world()[1]
    for index in tqdm(range(start, len(blocks)), desc="calibrate", disable=not progress, leave=False,
                      initial=start, total=len(blocks)):
        if load is not None:
            load(index)
        block = blocks[index]
        chunk_stats: dict[str, torch.Tensor] = {}  # the hooks fill it with one chunk's statistics
        current: dict = {}
        handles = [h for hooks in _hooks(kinds[index]) for h in hooks(family, kinds[index], block, heads,
                                                                       chunk_stats, current)]
        sums: dict = {}  # this block's statistics, summed over the chunks (on rank 0)
        try:
            for k in range(rounds(count)):
                c = round_chunk(k, count)
                mine = None
                if c is not None:
                    x, kw = hidden[c], kwargs[c][index]
                    if "position_embeddings" in kw:
                        cos, sin = kw["position_embeddings"]
                        current["rope"] = (cos.float(), sin.float())
                    out = block(x, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    chunk_stats["influence"] = torch.tensor(
                        (1 - torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1)).sum().item(),
                        dtype=torch.float64)
                    chunk_stats["tokens"] = torch.tensor(x.shape[0] * x.shape[1])
                    hidden[c] = out
                    # over several ranks the statistics travel as CPU tensors (gloo)
                    mine = {k: v.cpu() for k, v in chunk_stats.items()} if size > 1 else dict(chunk_stats)
                # every chunk of the round added in chunk order, on rank 0
                reduce_round(mine, sums, min(size, count - k * size), frozenset({"ssm_input"}))
                chunk_stats.clear()
        finally:
            for h in handles:
                h.remove()
        stats = None
        if sums:
            def there(name: str) -> torch.Tensor | None:  # sorted where the block computes
                return sums[name].to(device) if name in sums else None

            stats = BlockStats(influence=sums["influence"].item() / sums["tokens"].item(), tokens=int(sums["tokens"]),
                               mlp=there("mlp"), attn=there("attn"), q_sq=there("q_sq"), k_sq=there("k_sq"),
                               ssm_input=torch.cat(sums["ssm_input"]).to(device) if "ssm_input" in sums else None)
        yield index, stats


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.T @ x).double()


def _attention_hooks(family: Family, kind: str, block: torch.nn.Module, heads, stats: dict, current: dict) -> list:
    """Hooks that put one chunk's statistics of a block of attention and an MLP, or of either alone
    (``kind``), into ``stats`` (the fields of ``BlockStats``; ``current["rope"]``: this pass's cos and
    sin, absent for attention without RoPE)."""

    def on_down(module, args):
        stats["mlp"] = _gram(args[0])

    def rotated(out: torch.Tensor, count: int) -> torch.Tensor:
        x = out.float().unflatten(-1, (count, heads.head_dim))
        return _rotate(x, *current["rope"]) if "rope" in current else x

    pairs = QK in family.offers  # the rotated q and k, for the rotary pairs' scores

    def on_q(module, args, out):
        stats["attn"] = _gram(args[0])
        if pairs:
            stats["q_sq"] = rotated(out, heads.num_heads).square().sum((0, 1)).double()

    def on_k(module, args, out):
        stats["k_sq"] = rotated(out, heads.num_kv_heads).square().sum((0, 1)).double()

    handles = []
    if kind in MLP_KINDS:
        handles.append(family.part(block, FFN_DOWN).register_forward_pre_hook(on_down))
    if kind in ATTENTION_KINDS:
        handles.append(family.part(block, ATTN_Q).register_forward_hook(on_q))
        if pairs:
            handles.append(family.part(block, ATTN_K).register_forward_hook(on_k))
    return handles


def _ssm_hooks(family: Family, kind: str, block: torch.nn.Module, heads, stats: dict, current: dict) -> list:
    """A hook that keeps what enters an SSM block's mixer (the input of its projections) in one
    chunk, in float32."""

    def on_input(module, args):
        stats["ssm_input"] = args[0].float()

    return [family.part(block, SSM_IN_Z).register_forward_pre_hook(on_input)]


def _hooks(kind: str) -> list:
    """The hooks of a kind of block: a mixer's input, and attention's and an MLP's statistics."""
    return ([_ssm_hooks] if kind in SSM_KINDS else []) + \
        ([_attention_hooks] if kind in ATTENTION_KINDS or kind in MLP_KINDS else [])

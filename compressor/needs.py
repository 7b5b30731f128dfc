"""What a compression will need, said before it starts: peak memory per process and disk.

The figures come from the model's shapes (its config, built on the meta device) and the run's
options, counted the way the stages hold them: a streamed compression holds the token embedding,
one block in float32 and its statistics (float64 Gram matrices, and the Cholesky factor and
inverse sorting takes of the MLP's), the calibration activations of this rank's chunks and one
chunk's intermediate activations; the LM head comes in at the end, after the embedding left. A
source that cannot be streamed (a GGUF file, a family whose weights are converted on loading)
is held whole. Quantization and the measure of each rate's quality go block by block as well;
recovery's LoRA training holds the model whole (sharded, each rank still reads it whole in its
turn), counted twice for autograd's and AdamW's working memory: a bound, not a measured figure.
The figure is the largest stage's, a prediction within about 10% of the measured peak RSS
(``benchmarks/streaming.py``, ``tests/test_stream.py``) for the stages before recovery.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import ElastiqError
from ..machine import free_memory

CHUNK = 4  # calibration windows run through a block at once (calibrate's default)
BASELINE = 700 * 2 ** 20  # Python, torch, transformers and the tokenizer: 0.63 GB peak compressing a 2-layer model


@dataclass
class Needs:
    """Peak memory of one process and disk of the run, with what makes them up."""

    memory: int
    disk: int
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(f"{name} {size / 2 ** 30:.1f}" for name, size in self.parts.items())
        return (f"needs about {self.memory / 2 ** 30:.1f} GiB of memory per process (the largest stage's; "
                f"{shown} GiB) and {self.disk / 2 ** 30:.1f} GiB of disk")


def plan(source, samples: int, seqlen: int, quality_windows: int, quantize: bool = False,
         recover: bool = False) -> Needs:
    """The needs of compressing ``source`` (a model path or name) with these options, on as many
    ranks as this process is one of; nothing is loaded but the config."""
    from ..families import config_dict, family_for
    from .distributed import world
    from .intake import model_skeleton, source_path

    skeleton, streamed = model_skeleton(source)
    family = family_for(config_dict(skeleton.config))
    path = source_path(source)
    mapped = path.stat().st_size if streamed and path.is_file() else 0
    return compress_needs(skeleton, family.blocks(skeleton), streamed, samples, seqlen, quality_windows,
                          world()[1], quantize, recover, mapped)


def compress_needs(model: torch.nn.Module, blocks: list[torch.nn.Module], streamed: bool, samples: int,
                   seqlen: int, quality_windows: int, ranks: int = 1, quantize: bool = False,
                   recover: bool = False, mapped: int = 0) -> Needs:
    """The needs of compressing ``model`` (parameters on the meta device, or real: only shapes
    are read) whose decoder blocks are ``blocks``. ``mapped``: the bytes of a streamed GGUF file,
    which stays memory-mapped for the run, so that every page read stays in the process's
    resident memory (reclaimable, but counted: a Qwen2.5-Coder-1.5B Q4_K_M file of 1.04 GiB was
    most of a 1.5 GiB gap between this plan and the peak RSS measured before it was counted)."""
    config = model.config.get_text_config()
    hidden, vocab = config.hidden_size, config.vocab_size
    inter = getattr(config, "intermediate_size", None) or hidden * 4
    params = {id(p): p.numel() for p in model.parameters()}  # a tied head counts once
    whole = sum(params.values()) * 4
    embed = vocab * hidden * 4
    block = max(sum(p.numel() * 4 for p in b.parameters()) for b in blocks)
    mine = -(-samples // CHUNK // ranks) * CHUNK  # windows this rank runs, in whole chunks
    parts = {"baseline": BASELINE}
    if mapped:
        parts["mapped source"] = mapped
    if streamed:
        parts["embedding"] = embed
        parts["block"] = 2 * block  # the block and the copies sorting makes of one group's members
    else:
        parts["model"] = whole + block
    # Gram matrices (float64) of the MLP's and the attention's inputs: the running sum and one chunk's
    # (on any number of ranks: the sum travels a ring); then sorting holds the sum and two matrices
    # of the MLP's size at a time
    grams = (inter ** 2 + hidden ** 2) * 8
    parts["statistics"] = max(2 * grams, grams + 2 * inter ** 2 * 8)
    chunk = min(CHUNK, samples)  # and its causal mask, of booleans
    parts["activations"] = mine * seqlen * hidden * 4 + chunk * seqlen * (3 * inter + 4 * hidden) * 4 \
        + chunk * seqlen ** 2
    memory = sum(parts.values())
    ends = embed if getattr(config, "tie_word_embeddings", False) else 2 * embed  # embedding and head, float32
    if quality_windows:  # block by block too, with the dense model's and a rate's embedding and head
        parts["quality (at the end)"] = 2 * ends + block + quality_windows * seqlen * hidden * 4 \
            + 2 * seqlen * vocab * 4
        memory = max(memory, BASELINE + parts["quality (at the end)"])
    if quantize:  # GPTQ, block by block: the Hessians of the block's inputs and one matrix's inverse
        parts["quantize"] = ends + 2 * block + (3 * hidden ** 2 + 4 * inter ** 2) * 8 + mine * seqlen * hidden * 8
        memory = max(memory, BASELINE + parts["quantize"])
    if recover:  # LoRA training holds the model whole (its teacher is the same model), and its working memory
        parts["recover"] = 2 * whole
        memory = max(memory, BASELINE + parts["recover"])
    disk = whole  # the float checkpoint
    if quantize:
        disk += sum(params.values()) * 5 // 8  # Q4_0: 4.5 bits a weight; the float one stays till the end
    if recover:
        disk += whole
    return Needs(memory, disk, parts)


def check_room(needs: Needs, output: Path, device: torch.device = torch.device("cpu")) -> None:
    """Refuse a run that cannot fit: more memory than is free (the GPU's, on a GPU, where all but
    the process's baseline lies), or more disk than the output's file system has; the message
    says what the run needs and what to change."""
    folder = Path(output).resolve().parent
    while not folder.exists():
        folder = folder.parent
    disk = shutil.disk_usage(folder).free
    free = free_memory(device)
    needed = needs.memory - BASELINE if device.type == "cuda" else needs.memory  # the baseline is on the host
    if needed > free.bytes:
        raise ElastiqError(f"this compression {needs.describe()}; {free.bytes / 2 ** 30:.1f} GiB of memory is free "
                           f"({free.source}): lower --calib-samples or --calib-seqlen, measure fewer "
                           "--quality-windows, or run on a machine with more memory")
    if needs.disk > disk:
        raise ElastiqError(f"this compression {needs.describe()}; {folder} has {disk / 2 ** 30:.1f} GiB free: "
                           "write the output on a larger disk")

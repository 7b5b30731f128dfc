"""The runtime on llama.cpp and onnxruntime: engines with ``Engine``'s interface on one rate's export.

``elastiq run/chat --backend llama.cpp|onnxruntime`` runs the chosen rate through the GGUF or ONNX
exporter's file. Each rate is exported once into a cache beside the checkpoint,
``NAME.elastiq.exports/rate-R-KEY.gguf`` (or ``.onnx``), where KEY is a short hash of the
checkpoint's manifest, so a changed checkpoint never reuses a stale export (whose files are then
removed). The engines keep ``Engine``'s attributes and a ``generate.CachedGenerator`` (the longest common
prefix of the cached tokens is reused, the same stop rule and sampling as torch), so ``chat`` and
the CLI run unchanged on either. A rate switch loads
the other rate's export (exporting it first if it is not cached): unlike torch's in-place resize,
it reads that whole file.

Memory: ``predict_backend_footprint`` predicts what each backend holds, from the export's file
size when it exists and from the checkpoint's shapes as the exporter will write them otherwise:

- llama.cpp maps the GGUF (every page is touched while loading) and, where its CPU build repacks
  Q4_0 for its matmul kernels (``REPACK = 1``), holds a repacked copy of every Q4_0 matrix a
  matmul uses (a tied LM head is the embedding's duplicate); its KV cache is f16 at the FULL head
  size (pruned channels are zero-filled in the GGUF) for ``ctx`` rounded up to 256 cells; its
  compute buffer is reserved for a batch of ``n_ubatch`` tokens whose every logit is an output,
  or the attention scores and softmax of that batch, whichever is larger.
- onnxruntime holds the file's initializers and its own prepacked copy of every matrix; a call
  holds the past KV (float32, the kept widths) and its concatenated present; each prefill chunk
  returns the logits of every position.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import ElastiqError
from ..checkpoint import MANIFEST, Checkpoint, kv_bytes_per_token
from ..exporters import export
from ..families.base import ATTN_K, ATTN_OUT, ATTN_Q, ATTN_V, ROPE_PAIRS
from ..quants import BLOCK, BLOCK_BYTES
from .engine import Engine, Switch, check_ctx
from .generate import PREFILL_CHUNK, CachedGenerator
from .memory import Footprint, layer_widths, runtime_shapes

BACKENDS = ("torch", "llama.cpp", "onnxruntime")
FORMATS = {"llama.cpp": "gguf", "onnxruntime": "onnx"}
PACKAGES = {"llama.cpp": ("llama_cpp", "llama-cpp-python"), "onnxruntime": ("onnxruntime", "onnxruntime")}
LLAMA_CTX_PAD = 256  # llama.cpp rounds its KV cache up to a multiple of 256 cells
# The ONNX decoder returns logits for every position of a call, [chunk, vocab] float32 and copies
# of it: a smaller chunk than torch's (which computes the last position's logits only) bounds that.
ONNX_PREFILL_CHUNK = 64
GGUF_ALIGNMENT = 32  # gguf-py pads each tensor's data to this
SCORING_BATCH = 512  # tokens per llama.cpp batch when every position's logits are kept


def require(backend: str):
    """The backend's Python package, imported; a clear error when it is missing or unknown."""
    if backend not in PACKAGES:
        raise ElastiqError(f"backend {backend!r} is not known; accepted: {', '.join(BACKENDS)}")
    module, dist = PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ElastiqError(f"the {backend} backend needs the Python package {module} ({err}); install it with "
                           f"`pip install {dist}`, or run with --backend torch") from None


# --- the export cache ------------------------------------------------------------------------------

def export_key(ckpt: Checkpoint) -> str:
    """A short hash of the checkpoint's manifest (its sha256 per tensor makes it name the weights)."""
    return hashlib.sha256((ckpt.path / MANIFEST).read_bytes()).hexdigest()[:12]


def export_path(ckpt: Checkpoint, rate: float, backend: str) -> Path:
    """Where ``rate``'s export for ``backend`` is cached: beside the checkpoint, keyed by its manifest."""
    return ckpt.path.with_name(ckpt.path.name + ".exports") / f"rate-{rate}-{export_key(ckpt)}.{FORMATS[backend]}"


def cached_export(ckpt: Checkpoint, rate: float, backend: str) -> tuple[Path, float | None]:
    """The export of ``rate`` for ``backend``, written once (the exporters write a temporary name and
    rename it); returns its path and the seconds exporting took, None when the cache held it.
    Exports of this rate under another manifest key are stale and removed."""
    ckpt.rate_entry(rate)
    path = export_path(ckpt, rate, backend)
    if path.is_file():
        return path, None
    for stale in path.parent.glob(f"rate-{rate}-*.{FORMATS[backend]}"):
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        export(ckpt.path, rate, FORMATS[backend], path)
    except PermissionError as err:
        raise ElastiqError(f"cannot write the {backend} export cache {path.parent}: {err.strerror}; make the "
                           f"checkpoint's folder writable, or run with --backend torch") from None
    return path, time.perf_counter() - start


# --- memory ----------------------------------------------------------------------------------------

def _gguf_tensors(ckpt: Checkpoint, rate: float) -> tuple[int, int]:
    """Bytes of the tensors ``write_gguf`` writes for ``rate`` (pruned heads back at full size,
    Q4_0, Q8_0 or F16 matrices, F32 vectors, each padded to the alignment), and of the Q4_0
    matrices a matmul uses (the ones llama.cpp repacks; a tied head is the embedding's)."""
    config, heads = ckpt.manifest["source"]["config"], ckpt.heads
    full = {ATTN_Q: heads.num_heads * heads.head_dim, ATTN_K: heads.num_kv_heads * heads.head_dim,
            ATTN_V: heads.num_kv_heads * heads.head_dim}
    total = matmul = 0
    for name, (shape, _, fmt) in runtime_shapes(ckpt, rate).items():
        if name.endswith(ROPE_PAIRS):
            continue  # consumed by the full-size layout
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in full:
            shape = (full[parts[-2]], *shape[1:])
        elif len(parts) > 2 and parts[-2] == ATTN_OUT:
            shape = (shape[0], heads.num_heads * heads.head_dim)
        numel = math.prod(shape)
        nbytes = numel // BLOCK * BLOCK_BYTES[fmt] if fmt else numel * (2 if len(shape) == 2 else 4)
        total += -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
        used_by_matmul = name != "embed_tokens.weight" or config.get("tie_word_embeddings")
        if fmt == "q4_0" and len(shape) == 2 and shape[0] % 8 == 0 and used_by_matmul:
            matmul += nbytes
    return total, matmul


def _gguf_vocab(ckpt: Checkpoint, vocab_size: int) -> int:
    """Bytes of the tokenizer metadata ``write_gguf`` adds: every token (a length-prefixed string and
    an int32 type; ids the tokenizer lacks become short pad names), the merges, the chat template."""
    spec = json.loads((ckpt.path / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = {i: t for t, i in spec["model"].get("vocab", {}).items()}
    tokens.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    total = sum(8 + 4 + len(tokens.get(i, f"[PAD{i}]").encode()) for i in range(vocab_size))
    merges = spec["model"].get("merges", [])
    total += sum(8 + len((m if isinstance(m, str) else " ".join(m)).encode()) for m in merges)
    return total + len((ckpt.manifest["source"].get("chat_template") or "").encode())


def _onnx_weights(ckpt: Checkpoint, rate: float) -> int:
    """Bytes of the initializers ``write_onnx`` writes for ``rate``: MatMulNBits codes (4 or 8
    bits) and float32 scales, float32 matrices and vectors; a tied tensor once."""
    total = 0
    for name, (shape, stored_dtype, fmt) in ckpt.shapes(rate).items():
        numel = math.prod(shape)
        if fmt:
            total += (numel if fmt == "q8_0" else numel // 2) + numel // BLOCK * 4
        elif stored_dtype.is_floating_point:
            total += numel * 4
    return total


def _repacks_q4_0() -> bool:
    """Whether this llama.cpp build repacks Q4_0 weights for its CPU matmul kernels."""
    import llama_cpp

    return b"REPACK = 1" in llama_cpp.llama_print_system_info()


def predict_backend_footprint(ckpt: Checkpoint, rate: float, ctx: int, backend: str, baseline: int) -> Footprint:
    """The footprint of ``rate`` on ``backend`` (llama.cpp or onnxruntime) with ``ctx`` positions,
    on top of a process holding ``baseline`` bytes (see the module's docstring)."""
    config = ckpt.manifest["source"]["config"]
    heads, vocab, hidden = ckpt.heads, config["vocab_size"], config["hidden_size"]
    widest_mlp = max(layer.intermediate_size for layer in layer_widths(runtime_shapes(ckpt, rate), heads))
    path = export_path(ckpt, rate, backend)
    if backend == "llama.cpp":
        tensors, matmul = _gguf_tensors(ckpt, rate)
        file_bytes = path.stat().st_size if path.is_file() else tensors + _gguf_vocab(ckpt, vocab)
        weights = file_bytes + (matmul if _repacks_q4_0() else 0)
        cells = -(-ctx // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
        layers = config["num_hidden_layers"]
        kv = cells * layers * 2 * heads.num_kv_heads * heads.head_dim * 2
        ubatch = min(ctx, PREFILL_CHUNK)
        workspace = ubatch * 4 * max(vocab + hidden, 2 * heads.num_heads * cells + 3 * hidden + 3 * widest_mlp) \
            + vocab * 4  # the output buffer of one token's logits
        return Footprint(rate, weights, kv, workspace, baseline)
    if backend == "onnxruntime":
        initializers = path.stat().st_size if path.is_file() else _onnx_weights(ckpt, rate)
        weights = 2 * initializers  # the initializers and onnxruntime's prepacked copy of the matrices
        widths = ckpt.rate_entry(rate)["widths"]
        kv = 2 * ctx * kv_bytes_per_token(ckpt.groups, widths, heads, 4)  # past and present during a call
        chunk = min(ctx, ONNX_PREFILL_CHUNK)
        workspace = chunk * 4 * (2 * vocab + 8 * hidden + 3 * widest_mlp + 2 * heads.num_heads * ctx)
        return Footprint(rate, weights, kv, workspace, baseline)
    raise ElastiqError(f"backend {backend!r} has no export-based footprint; accepted: {', '.join(FORMATS)}")


# --- generation on an export -----------------------------------------------------------------------

class LlamaCppGenerator(CachedGenerator):
    """Generation through a ``llama_cpp.Llama``: its ``n_tokens`` is moved back to the reused prefix,
    and ``eval`` drops the cache beyond it before running the new tokens."""

    def __init__(self, llm, max_seq: int):
        super().__init__(max_seq)
        self.llm = llm

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        import llama_cpp

        self.llm.n_tokens = start
        self.llm.eval(tokens)
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).copy())

    def reset(self) -> None:
        super().reset()
        self.llm.reset()


class OnnxGenerator(CachedGenerator):
    """Generation through an onnxruntime session of the ONNX decoder: prefill in chunks, then one
    token at a time, each call's presents fed back as the next call's past."""

    def __init__(self, session, max_seq: int):
        super().__init__(max_seq)
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values.")}
        self.cache: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.cache = {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self.past.items()}

    def _run(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        self.cache = {name: v[:, :, :start] for name, v in self.cache.items()}
        for i in range(0, len(tokens), ONNX_PREFILL_CHUNK):
            chunk = np.array([tokens[i:i + ONNX_PREFILL_CHUNK]], dtype=np.int64)
            end = start + i + chunk.shape[1]
            outs = self.session.run(self.outputs, {
                "input_ids": chunk, "attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start + i, end, dtype=np.int64)[None], **self.cache})
            self.cache = {n.replace("present.", "past_key_values."): v for n, v in zip(self.outputs[1:], outs[1:])}
            logits = outs[0][0, -1]
        return torch.from_numpy(logits.copy())


# --- engines ---------------------------------------------------------------------------------------

class ExportEngine:
    """One rate of ``checkpoint`` run by another backend on its cached export, with ``Engine``'s
    interface. Activations and logits are float32 (``dtype``); ``threads`` defaults to torch's
    thread count. ``load_seconds`` and ``load_bytes`` are those of opening the export (its file
    size); ``export_seconds`` is the time exporting took, None when the cache held the export.
    ``scoring`` prepares the backend for ``logits`` (llama.cpp then keeps every position's logits,
    ``ctx`` x vocab floats)."""

    backend = ""

    def __init__(self, checkpoint: str | Path | Checkpoint, rate: float, ctx: int = 2048, tokenizer=None,
                 threads: int | None = None, scoring: bool = False):
        self.package = require(self.backend)
        self.ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        self.config = self.ckpt.manifest["source"]["config"]
        check_ctx(self.config, ctx)
        self.ckpt.rate_entry(rate)  # an unoffered rate fails before anything is exported
        self.int4 = self.ckpt.manifest["quantization"] is not None
        self.dtype, self.device, self.ctx = torch.float32, torch.device("cpu"), ctx
        self.threads = threads or torch.get_num_threads()
        self.tokenizer = tokenizer or self.ckpt.tokenizer()
        self.generator = None
        self.scoring = scoring
        self.rate = rate
        self._open(rate)

    def _open(self, rate: float) -> None:
        """Export ``rate`` if the cache lacks it, then load it (the previous model is freed first)."""
        self.export, self.export_seconds = cached_export(self.ckpt, rate, self.backend)
        self._close()
        start = time.perf_counter()
        self.generator = self._load(self.export)
        self.load_seconds = time.perf_counter() - start
        self.load_bytes = self.export.stat().st_size

    def _load(self, path: Path) -> CachedGenerator:
        raise NotImplementedError

    def _close(self) -> None:
        self.generator = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of every position of right-padded ``ids`` [B, T], each row
        run from position 0 on an empty cache: what evaluation scores."""
        raise NotImplementedError

    def set_rate(self, rate: float) -> Switch:
        """Move to ``rate`` by loading its export (written first if the cache lacks it); the cache of
        tokens is emptied. ``bytes_read`` is the size of the export loaded."""
        self.ckpt.rate_entry(rate)
        start, old = time.perf_counter(), self.rate
        if rate == old:
            return Switch(old, rate, time.perf_counter() - start, 0)
        self._open(rate)
        self.rate = rate
        return Switch(old, rate, time.perf_counter() - start, self.load_bytes)


class LlamaCppEngine(ExportEngine):
    """The rate's GGUF export run by llama.cpp (llama-cpp-python), with a KV cache of ``ctx`` positions."""

    backend = "llama.cpp"

    def _load(self, path: Path) -> LlamaCppGenerator:
        llm = self.package.Llama(str(path), n_ctx=self.ctx, n_threads=self.threads, n_threads_batch=self.threads,
                                 n_batch=min(self.ctx, SCORING_BATCH if self.scoring else PREFILL_CHUNK),
                                 logits_all=self.scoring, verbose=False)
        return LlamaCppGenerator(llm, self.ctx)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.scoring:
            raise ElastiqError("this llama.cpp engine keeps only the last logits; open it with scoring=True")
        llm, out = self.generator.llm, []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:len(row)], dtype=np.float32)))
        self.generator.reset()  # the cached tokens are the last row's, not a conversation's
        return torch.stack(out)

    def _close(self) -> None:
        if self.generator is not None:
            self.generator.llm.close()
        super()._close()


class OnnxEngine(ExportEngine):
    """The rate's ONNX export run by onnxruntime on the CPU; the KV cache grows to ``ctx`` positions."""

    backend = "onnxruntime"

    def _load(self, path: Path) -> OnnxGenerator:
        options = self.package.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        session = self.package.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return OnnxGenerator(session, self.ctx)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        generator = self.generator
        batch, length = ids.shape
        empty = {name: np.zeros((batch, shape[1], 0, shape[3]), np.float32) for name, shape in generator.past.items()}
        outs = generator.session.run(generator.outputs[:1], {
            "input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy(), **empty})
        return torch.from_numpy(outs[0])


ENGINES = {"llama.cpp": LlamaCppEngine, "onnxruntime": OnnxEngine}


def open_engine(backend: str, checkpoint: str | Path | Checkpoint, rate: float, ctx: int,
                dtype: torch.dtype | None = None, verify: bool = True, tokenizer=None,
                scoring: bool = False) -> Engine | ExportEngine:
    """The engine of ``backend`` at ``rate``. ``dtype`` and ``verify`` are torch's (an export's
    reads of the checkpoint always verify; the other backends compute in their own types);
    ``scoring`` prepares an export's engine for ``logits`` (torch's always can)."""
    if backend == "torch":
        return Engine(checkpoint, rate, ctx, dtype, verify=verify, tokenizer=tokenizer)
    if backend not in ENGINES:
        raise ElastiqError(f"backend {backend!r} is not known; accepted: {', '.join(BACKENDS)}")
    return ENGINES[backend](checkpoint, rate, ctx, tokenizer=tokenizer, scoring=scoring)

"""Shared fixtures: tiny random models of each supported family and an offline tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where the folder kernels/ would shadow
# PyPI's `kernels` package (transformers imports that name to probe for it). elastiq is imported
# from its installed package, never from the root, so the root is dropped before anything imports.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


def _import_triton_language_interpreted() -> None:
    """Triton decorates its own library functions (``tl.sum``, ``tl.max`` ...) once, when
    ``triton.language`` is first imported, as interpreted functions only if TRITON_INTERPRET=1
    then; a kernel run by the interpreter cannot call compiled ones. transformers imports Triton
    too, so the session imports it first under the interpreter. Kernels stay off the interpreter
    unless a test sets the variable (the dispatch reads it at each call)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_language_interpreted()
os.environ["HF_DATASETS_OFFLINE"] = "1"

from elastiq.checkpoint import Checkpoint  # noqa: E402  (once the hub is offline and Triton interpreted)
from elastiq.compressor import allocate as _allocate  # noqa: E402

TEXT = "Robert Boulter is an English film , television and theatre actor . He had a guest role in 2000 ."


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastiq-cache")


@pytest.fixture(autouse=True)
def _private_cache(request, _session_cache, monkeypatch) -> None:
    """elastiq's cache (remembered backend speeds, checkpoints built from models) is a folder of the
    test session, never the user's: except for the realmodel tests, which build the default model
    once in the user's cache as the README's first command does, with the shipped defaults."""
    if request.node.get_closest_marker("realmodel") is None:
        monkeypatch.setenv("ELASTIQ_CACHE", str(_session_cache))
    else:
        _kind_weights(monkeypatch, SHIPPED_KIND_WEIGHTS)


SHIPPED_KIND_WEIGHTS = dict(_allocate.DEFAULT_KIND_WEIGHTS)


def _kind_weights(patch: pytest.MonkeyPatch, weights: dict) -> None:
    """Make ``weights`` the default kind weights of ``compress`` and the command line."""
    patch.setattr(_allocate, "DEFAULT_KIND_WEIGHTS", weights)


@pytest.fixture(scope="session", autouse=True)
def _every_kind_pruned():
    """The shipped allocation keeps V/O whole (``DEFAULT_KIND_WEIGHTS``). In tests every kind of
    group takes its block's ratio instead, so that each axis, V/O ranks included, is pruned,
    sliced, exported and run; tests of the default itself pass ``SHIPPED_KIND_WEIGHTS``, and
    commands run in a subprocess get the shipped default."""
    with pytest.MonkeyPatch.context() as patch:
        _kind_weights(patch, {})
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from elastiq.paths import data_dir as find

    return find()


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    """A byte-level BPE tokenizer (512 tokens) trained offline on WikiText-2 lines, with a
    ChatML template like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()[:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.fixture
def ids(tokenizer) -> torch.Tensor:
    """One sequence of the tiny models' tests: TEXT twice."""
    return torch.tensor([tokenizer.encode(TEXT + " " + TEXT)])


def compressed(folder: Path, data_dir: Path, out: Path) -> Checkpoint:
    """``folder``'s model compressed as the hybrids' tests take it: rates 0.15 and 0.35, four
    calibration windows of 40 tokens, two held-out quality windows, no recovery, float."""
    from elastiq.compressor.compress import CompressOptions, compress

    options = CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=40, quality_windows=2)
    return Checkpoint(compress(folder, out, options, data=data_dir, progress=False))


def quantized(ckpt: Checkpoint, data_dir: Path, out: Path, method: str = "gptq") -> Checkpoint:
    """``ckpt`` quantized to 4 bits (GPTQ by default) into ``out``."""
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    return Checkpoint(quantize_checkpoint(ckpt.path, out, QuantizeOptions(method=method), data=data_dir,
                                          progress=False))


def tiny_config(family: str, vocab_size: int):
    """A 2-layer random configuration of ``family`` with GQA (4 query heads, 2 KV heads) and a
    head size of 64, so that V/O ranks can be pruned in whole blocks of 32."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family](**common)


def build_tiny(family: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)), dtype=torch.float32).eval()


def context_dependent(family: str, tokenizer, folder: Path) -> Path:
    """A tiny model of ``family`` saved (with ``tokenizer``) in ``folder``, whose greedy output
    depends on the context: at transformers' initialisation (std 0.02) a 2-layer model repeats one
    token, and agreeing on it would say nothing. Here the blocks have unit gain (std 1/sqrt(fan-in),
    biases std 0.1) and the (tied) embeddings are small, so that a token's own embedding does not
    dominate its logits; the final norm's weight of 20 brings the logits to a spread of about +-25."""
    model = build_tiny(family, tokenizer, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() == 2:
                p.normal_(0, 0.05 if "embed" in name else p.shape[1] ** -0.5)
        model.model.norm.weight.fill_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return build_tiny("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Saved Hugging Face folders (safetensors + tokenizer) of each supported family."""
    dirs = {}
    for family in ("llama", "mistral", "qwen2"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny(family, tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="session")
def models(tokenizer, tmp_path_factory):
    """Tiny Llama and Qwen2 folders (Qwen2 with non-zero biases) and their logits on TEXT."""
    out = {}
    for family in ("llama", "qwen2"):
        model = build_tiny(family, tokenizer, seed=3)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(f"src-{family}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with torch.no_grad():
            out[family] = (path, model(torch.tensor([tokenizer.encode(TEXT)])).logits)
    return out


def dense_gguf(model, tokenizer, folder: Path, data_dir: Path) -> tuple[Path, Path]:
    """``model`` and ``tokenizer`` saved as a Hugging Face folder under ``folder``, compressed to a
    checkpoint offering rate 0 only, and that rate written as a float32 GGUF: (checkpoint, GGUF)."""
    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.exporters.gguf import write_gguf

    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    options = CompressOptions(rates=(), calib_samples=2, calib_seqlen=16, quality_windows=0)
    ckpt = compress(folder / "hf", folder / "dense.elastiq", options, data=data_dir, progress=False)
    return ckpt, write_gguf(ckpt, 0.0, folder / "dense.gguf", float_type="f32")


def model_groups(model) -> tuple[list, object]:
    """The prunable groups of every block of a transformers model, and its attention heads."""
    from elastiq.families import family_for

    config = model.config.to_dict()
    family = family_for(config)
    return [g for i in range(config["num_hidden_layers"]) for g in family.groups(config, i)], family.heads(config)


def with_pairs(model, tensors: dict | None = None) -> dict:
    """``tensors`` (the model's state dict by default) with each block's identity rotary pair
    indices, which a checkpoint's Q/K groups carry."""
    from elastiq.families import family_for
    from elastiq.families.base import ROPE_PAIRS

    config = model.config.to_dict()
    family, heads = family_for(config), family_for(config).heads(config)
    out = dict(model.state_dict() if tensors is None else tensors)
    for i in range(config["num_hidden_layers"]):
        out[family.name_of(i, ROPE_PAIRS)] = torch.arange(heads.head_dim // 2).repeat(heads.num_kv_heads, 1).int()
    return out


def masked_weights(weights: dict, ckpt, rate: float) -> dict:
    """``weights`` (the full model of checkpoint ``ckpt``; quantized matrices are dequantized)
    with every unit that ``rate`` prunes set to zero."""
    from elastiq.layouts import from_storage, to_storage
    from elastiq.quants import Quantized

    out = {k: (v.dequantize() if isinstance(v, Quantized) else v.clone()) for k, v in weights.items()}
    widths = ckpt.rate_entry(rate)["widths"]
    for g in ckpt.groups:
        for name, role in g.members:
            if role != "pairs":
                s = to_storage(out[name], role, ckpt.heads)
                s[widths[g.name]:] = 0
                out[name] = from_storage(s, role, ckpt.heads)
    return out


@pytest.fixture(scope="session")
def nested_checkpoints(models, data_dir, tmp_path_factory) -> dict:
    """Nested checkpoints of the tiny Llama and Qwen2 (biased q/k/v) offering rates 0, 0.15 and
    0.35: float ("llama", "qwen2") and 4-bit by round-to-nearest ("llama-q4", "qwen2-q4"); with an
    8-bit embedding and head: "llama-q8" (tied) and "qwen2-q8", quantized from "qwen2-rotated"
    (the rotation unties the head)."""
    from elastiq.compressor.compress import CompressOptions, compress
    from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("nested")
    out = {}
    for family, rotate in (("llama", False), ("qwen2", False), ("qwen2-rotated", True)):
        path = compress(models[family.removesuffix("-rotated")][0], root / f"{family}.elastiq",
                        CompressOptions(rates=(0.15, 0.35), calib_samples=4, calib_seqlen=32, rotate=rotate),
                        data=data_dir, progress=False)
        out[family] = Checkpoint(path)
    quantized = {"llama-q4": ("llama", 4), "qwen2-q4": ("qwen2", 4), "llama-q8": ("llama", 8),
                 "qwen2-q8": ("qwen2-rotated", 8)}
    for name, (source, bits) in quantized.items():
        out[name] = Checkpoint(quantize_checkpoint(out[source].path, root / f"{name}.elastiq",
                                                   QuantizeOptions(method="rtn", embedding_bits=bits), data=data_dir,
                                                   progress=False))
    return out


def reseal(path: Path) -> Path:
    """Checkpoint ``path`` after a deliberate edit of its manifest or tokenizer files: their sha256
    recomputed, as a rebuilt checkpoint would have them (a damaged one keeps the old ones)."""
    import hashlib
    import json

    from elastiq.manifest import DIGEST, FILES, digest

    manifest = json.loads((path / "manifest.json").read_text())
    manifest[FILES] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in manifest[FILES]}
    manifest[DIGEST] = digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path

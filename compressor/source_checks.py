"""Checks of an untrusted model source, each done before transformers reads what it checks.

transformers trusts a model's files: a config field of the wrong type or out of range surfaces
as a ZeroDivisionError or a negative-dimension error, a config whose sizes disagree with the
weights allocates the model it describes before it compares shapes (a hidden size of 2**20 on a
tiny model takes 11 GB and a minute), a tensor the weights lack is initialised at random with
only a warning, and malformed index or tokenizer files raise KeyError or TypeError. Here the
config's fields are checked by type and range, the safetensors headers (never their data) and
tokenizer files are read, and the model the config describes is built on the meta device
(no memory) and compared, tensor by tensor and in total, with the weights the files hold.
Every problem is a ``ModelLoadError`` naming the file, the field and what was expected.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from gguf import GGUFValueType

from .. import ElastiqError
from ..families import FAMILIES
from .gguf_header import Array

MAX_JSON_BYTES = 64 << 20  # a config, index or tokenizer config is kilobytes; refuse to read a huge one
MAX_SIZE = 1 << 31  # no model dimension comes near this; larger ones only overflow or allocate
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim")  # null: derived from the others
# q.k scale keys come from the families that name one (Gemma 3's query_pre_attn_scalar).
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", *sorted({f.attention_scalar for f in FAMILIES if f.attention_scalar}))
ROPE_FIELDS = ("rope_parameters", "rope_scaling")
DTYPE_FIELDS = ("dtype", "torch_dtype")
BOOL_FIELDS = ("tie_word_embeddings",)
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "vocab_size")  # what an error about shapes quotes from the config
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"  # transformers' file names
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ModelLoadError(ElastiqError):
    """The model source is missing, unreadable, malformed or of an unsupported architecture."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (the CLI prints each error as one)."""
    return " ".join(str(err).split())


def shown(value: object) -> str:
    """``value`` for a message: strings quoted, at most 60 characters (a file may hold anything)."""
    text = str(value) if not isinstance(value, (str, bytes)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float) and math.isfinite(value)) and value > 0


def read_json_object(file: Path) -> dict:
    """The JSON object in ``file``, read only if it is of a config's size."""
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelLoadError(f"{file} is {size:,} bytes; a model's JSON files are far smaller "
                                 f"(at most {MAX_JSON_BYTES:,} bytes are read)")
        value = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8 or not JSON
        raise ModelLoadError(f"cannot read {file}: {one_line(err)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, not {type(value).__name__}")
    return value


def check_config(config: Mapping, where: str, names: Mapping[str, str] | None = None, prefix: str = "") -> None:
    """Refuse config fields of the wrong type or out of range (each checked where present, since
    transformers supplies defaults; a default that does not fit the weights is caught by
    ``check_weights``). Sub-configs (``text_config``, ...) are checked the same way. ``names``
    gives a field's name in the source (a GGUF metadata key) where it differs."""
    def name(field: str) -> str:
        return (names or {}).get(field, prefix + field)

    def fail(field: str, expected: str, value: object) -> None:
        raise ModelLoadError(f"{where}: {name(field)} must be {expected}, got {shown(value)}")

    for field in POSITIVE_INTS + OPTIONAL_INTS:
        if field not in config or (config[field] is None and field in OPTIONAL_INTS):
            continue
        if not (_is_int(config[field]) and 1 <= config[field] <= MAX_SIZE):
            fail(field, f"an integer from 1 to {MAX_SIZE}", config[field])
    for field in POSITIVE_NUMBERS:
        if field in config and not _is_positive_number(config[field]):
            fail(field, "a positive number", config[field])
    for field in BOOL_FIELDS:
        if field in config and not isinstance(config[field], bool):
            fail(field, "true or false", config[field])
    for field in DTYPE_FIELDS:
        value = config.get(field)
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        if value is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            fail(field, "the name of a floating-point torch dtype (float32, bfloat16, ...)", value)
    for field in ROPE_FIELDS:
        if config.get(field) is not None:
            _check_rope(config[field], name(field), where)
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size", MAX_SIZE)
    if pad is not None and not (_is_int(pad) and -vocab <= pad < vocab):  # nn.Embedding's padding_idx
        fail("pad_token_id", f"null or a token id below {name('vocab_size')} ({vocab})", pad)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ModelLoadError(f"{where}: {name('num_attention_heads')} ({heads}) must be a multiple of "
                             f"{name('num_key_value_heads')} ({kv_heads})")
    if heads and config.get("head_dim") is None and config.get("hidden_size", 0) % heads:
        raise ModelLoadError(f"{where}: {name('hidden_size')} ({config['hidden_size']}) must be a multiple of "
                             f"{name('num_attention_heads')} ({heads}) when no {name('head_dim')} is given")
    for key, sub in config.items():
        if key.endswith("_config") and sub is not None:
            if not isinstance(sub, Mapping):
                fail(key, "an object", sub)
            check_config(sub, where, names, prefix=f"{prefix}{key}.")


def _check_rope(value: object, label: str, where: str) -> None:
    """A RoPE object: a positive ``rope_theta`` and ``factor``, a ``rope_type`` transformers
    knows; nested objects (one per layer type) alike."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if not isinstance(value, Mapping):
        raise ModelLoadError(f"{where}: {label} must be an object or null, got {shown(value)}")
    types = ("default", *ROPE_INIT_FUNCTIONS)
    for key, item in value.items():
        if key in ("rope_theta", "factor") and not _is_positive_number(item):
            raise ModelLoadError(f"{where}: {label}.{key} must be a positive number, got {shown(item)}")
        if key in ("rope_type", "type") and item not in types:
            raise ModelLoadError(f"{where}: {label}.{key} must be one of {', '.join(types)}; got {shown(item)}")
        if isinstance(item, Mapping):
            _check_rope(item, f"{label}.{key}", where)


def gguf_config_fields(metadata: Mapping, arch: str) -> tuple[dict, dict[str, str]]:
    """The config fields a GGUF's metadata gives, by the names transformers maps its keys to,
    and each field's source (for ``check_config``). The head size is
    ``{arch}.attention.key_length`` where the file has one (intake passes it on); the vocabulary
    size without ``{arch}.vocab_size`` is the token list's length, as transformers takes it."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    keys = {field: f"{prefix}.{suffix}" for prefix in (arch, "tokenizer")
            for suffix, field in GGUF_CONFIG_MAPPING.get(prefix, {}).items() if field}
    if f"{arch}.attention.key_length" in metadata:
        keys["head_dim"] = f"{arch}.attention.key_length"
    fields = {field: metadata[key] for field, key in keys.items() if key in metadata}
    tokens = metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in fields and isinstance(tokens, Array):
        fields["vocab_size"], keys["vocab_size"] = tokens.count, "the length of tokenizer.ggml.tokens"
    return fields, keys


def check_gguf_tokenizer(metadata: Mapping, where: str) -> None:
    """Refuse the tokenizer metadata transformers would fail on with a traceback: it builds a
    GGUF's tokenizer from ``tokenizer.ggml.tokens`` (strings), per-token lists of the same length
    and special token ids that index it."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not (isinstance(tokens, Array) and tokens.item_type == GGUFValueType.STRING):
        raise ModelLoadError(f"{where}: tokenizer.ggml.tokens must be an array of strings (the vocabulary), got "
                             f"{shown(tokens)}")
    if not isinstance(metadata.get("tokenizer.ggml.model"), str):
        raise ModelLoadError(f"{where}: tokenizer.ggml.model must name the tokenizer (gpt2, llama, ...), got "
                             f"{shown(metadata.get('tokenizer.ggml.model'))}")
    for key, value in metadata.items():
        if key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type") and \
                not (isinstance(value, Array) and value.count == tokens.count):
            raise ModelLoadError(f"{where}: {key} must be an array of {tokens.count} values (one per token), got "
                                 f"{shown(value)}")
        if key == "tokenizer.ggml.merges" and \
                not (isinstance(value, Array) and value.item_type == GGUFValueType.STRING):
            raise ModelLoadError(f"{where}: {key} must be an array of strings, got {shown(value)}")
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and \
                not (_is_int(value) and 0 <= value < tokens.count):
            raise ModelLoadError(f"{where}: {key} must be a token id below {tokens.count}, got {shown(value)}")


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the safetensors weights transformers reads from ``folder``
    (``model.safetensors``, else the shards ``model.safetensors.index.json`` names), read from
    their headers; the safetensors library checks each header against its file's size."""
    from safetensors import SafetensorError, safe_open

    files, placed = weight_files(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, "pt") as st:
                held = {name: tuple(st.get_slice(name).get_shape()) for name in st.keys()}
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({one_line(err)})") from None
        shapes.update(held)
        for name, shard in placed.items():
            if shard == file and name not in held:
                raise ModelLoadError(f"{folder / SAFETENSORS_INDEX} places {name} in {file.name}, which does not "
                                     "hold it")
    return shapes


def weight_files(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """The weight files, and {tensor name: its file} as the index places them (none without one)."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS], {}
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        if any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} has .safetensors files but neither {SAFETENSORS} nor "
                                 f"{SAFETENSORS_INDEX} naming its shards")
        raise ModelLoadError(f"{folder} has no .safetensors weights (pickled .bin files are never loaded); "
                             "convert them with transformers' save_pretrained(safe_serialization=True)")
    content = read_json_object(index)
    weight_map = content.get("weight_map")
    if not isinstance(content.get("metadata"), dict) or not isinstance(weight_map, dict) or \
            not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index} must hold a \"metadata\" object and a \"weight_map\" object naming each "
                             "tensor's shard file")
    outside = sorted({s for s in weight_map.values() if Path(s).name != s or s in ("", ".", "..")})
    if outside:
        raise ModelLoadError(f"{index} names shards outside its folder: {', '.join(map(repr, outside[:3]))}")
    missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
    if missing:
        raise ModelLoadError(f"{index} names shards that are missing: {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return [folder / s for s in sorted(set(weight_map.values()))], {n: folder / s for n, s in weight_map.items()}


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a folder without a tokenizer or with one that transformers would fail on with a
    traceback (a tokenizer config that is no JSON object, a ``tokenizer.json`` the tokenizers
    library cannot read)."""
    from tokenizers import Tokenizer

    config_file = folder / "tokenizer_config.json"
    config = read_json_object(config_file) if config_file.is_file() else {}
    if not isinstance(config.get("tokenizer_class", ""), (str, type(None))):
        raise ModelLoadError(f"{config_file}: tokenizer_class must be a string, got {shown(config['tokenizer_class'])}")
    for key in SPECIAL_TOKENS:
        token = config.get(key)
        if not (token is None or isinstance(token, str) or isinstance(token, dict) and
                isinstance(token.get("content"), str)):
            raise ModelLoadError(f"{config_file}: {key} must be a string, an object with a string \"content\" or "
                                 f"null, got {shown(token)}")
    file = folder / "tokenizer.json"
    if not file.is_file():
        if not any((folder / name).is_file() for name in ("tokenizer.model", "vocab.json")):
            raise ModelLoadError(f"{folder} has no tokenizer: expected tokenizer.json (or tokenizer.model, or "
                                 "vocab.json and merges.txt)")
        return
    with tokenizer_errors(f"{file} is not a readable tokenizer file"):
        Tokenizer.from_file(str(file))


@contextmanager
def tokenizer_errors(problem: str) -> Iterator[None]:
    """Report the tokenizers library's errors as a ModelLoadError stating ``problem``: it raises
    the bare Exception class (no subclass) for every malformed vocabulary, so exactly that class
    is caught and any other exception passes."""
    try:
        yield
    except Exception as err:
        if type(err) is not Exception:
            raise
        raise ModelLoadError(f"{problem} ({one_line(err)})") from None


def _layer_counts(config: Mapping) -> Iterator[int]:
    if _is_int(config.get("num_hidden_layers")):
        yield config["num_hidden_layers"]
    for value in config.values():
        if isinstance(value, Mapping):
            yield from _layer_counts(value)


def _sizes(config) -> str:
    text = config.get_text_config()
    return ", ".join(f"{f} {getattr(text, f)}" for f in SIZES if getattr(text, f, None) is not None)


def _gguf_names(arch: str, layers: int) -> Callable[[str], str | None]:
    """A transformers tensor name's GGUF name (gguf-py's map, which transformers reads with)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, layers)
    return lambda name: names.get_name(name, try_suffixes=(".weight", ".bias"))


def check_weights(config, shapes: Mapping[str, tuple[int, ...]], where: str, gguf_arch: str | None = None) -> None:
    """Refuse weights that cannot be the model ``config`` (a transformers config) describes,
    before transformers allocates it: more layers than tensors, a tensor of another shape than
    the model's (names as in the files: the model's own, or GGUF names for a GGUF of
    architecture ``gguf_arch``), or fewer weights in all than the model has. The model is built
    on the meta device, which allocates nothing."""
    from transformers import AutoModelForCausalLM

    layers = max(_layer_counts(config.to_dict()), default=0)
    if layers > len(shapes):
        raise ModelLoadError(f"{where}: the config's {layers} layers cannot be made of the {len(shapes)} "
                             "tensors the weights hold")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stored = _gguf_names(gguf_arch, config.get_text_config().num_hidden_layers) if gguf_arch else (lambda n: n)
    for name, t in model.state_dict().items():
        key = stored(name)
        if key in shapes and shapes[key] != tuple(t.shape):
            raise ModelLoadError(f"{where}: tensor {key} is {list(shapes[key])}, but the config ({_sizes(config)}) "
                                 f"calls for {list(t.shape)}")
    needed = sum(p.numel() for p in model.parameters())
    held = sum(math.prod(s) for s in shapes.values())
    if needed > held:
        raise ModelLoadError(f"{where}: the config ({_sizes(config)}) describes a model of {needed:,} weights, but "
                             f"the files hold {held:,}")


def check_loading_info(info: Mapping, where: str) -> None:
    """Refuse a load that left model tensors at their random initialisation, or left weights of
    the files unused (the config and the weights disagree); transformers only warns of either."""
    for key, problem in (("missing_keys", "lacks weights the model needs"),
                         ("unexpected_keys", "holds weights its config has no place for")):
        names = sorted(info[key])
        if names:
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            raise ModelLoadError(f"{where} {problem}: {', '.join(names[:4])}{more}")

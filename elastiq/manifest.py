"""The manifest of a nested checkpoint: its parts (heads, groups, the bytes a rate keeps) and its
schema, every field of ``manifest.json`` checked when a checkpoint is opened, before a weight is
read (``docs/format.md``, section 6.1).

A checkpoint travels from the cloud to a phone, so its manifest is untrusted input. ``validate``
checks each field's presence, type and range; the groups, widths and rates against each other;
and each tensor entry against the safetensors header (dtype, shape, a byte range inside the
file). A violation is one ``CheckpointError`` naming the field and what was expected. From
version 3 the manifest also records its own sha256 and the tokenizer files' (``digest``), so
that accidental damage to any byte of the checkpoint is refused instead of run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import ElastiqError
from .layouts import ROLES, Layout, known_role
from .quants import BLOCK, FORMATS

FORMAT = "elastiq-nested-checkpoint"
DIGEST, FILES = "manifest_sha256", "files"  # version 3's integrity fields
V1_ROLES = (*ROLES, "cols_blocks", "o_blocks")
KV_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
QUALITY = {"heldout_ppl": "a positive number", "kl_mean": "a number of 0 or more",
           "kl_p99": "a number of 0 or more", "top1_agreement": "a number in [0, 1]",
           "tokens": "a positive integer"}
MAX_DIM = 2 ** 31  # no axis of a tensor, and no width, is longer
_TOP = ("format", "format_version", "source", "heads", "kv_cache_dtype", "quantization", "groups", "rates",
        "tensors", "aliases")
_ENTRY = ("layout", "group", "dtype", "shape", "storage_shape", "unit_channels", "segments", "part_of", "part",
          "format")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CODES = {"q4_0": ("U8", 16), "q8_0": ("I8", 32)}  # each format's codes: dtype, bytes of a block


class CheckpointError(ElastiqError):
    """A checkpoint is missing, corrupted, truncated, of an unknown version, or asked for the wrong
    rate; or a manifest field is missing, of the wrong type or out of range, or disagrees with the rest."""


def digest(manifest: Mapping) -> str:
    """The sha256 of ``manifest`` without its own ``manifest_sha256`` field, over canonical JSON
    (sorted keys, no spaces), so that it does not depend on how the file is indented."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the manifest's parts ---------------------------------------------------------------------

MLP, QK, VO, SSM_P, SSM_N = "mlp", "qk", "vo", "ssm_p", "ssm_n"  # group kinds
KINDS = (MLP, QK, VO, SSM_P, SSM_N)
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
           torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Heads:
    """Attention shape that fixes the Q/K/V/O layouts: H query heads, G KV heads, head size d."""

    num_heads: int
    num_kv_heads: int
    head_dim: int



@dataclass(frozen=True)
class Group:
    """A prunable group of one block: the unit of sorting, one permutation and one kept width.

    ``width`` counts the group's units: MLP channels, rotary pairs per KV head (``qk``), V/O
    rank per KV head (``vo``), channels per SSM head (``ssm_p``) or states per SSM group
    (``ssm_n``); a kept width is a multiple of ``granularity``. Each member is a
    (tensor name, role) pair; the role fixes the tensor's storage layout (``layouts.role_layout``).
    """

    kind: str
    layer: int
    width: int
    granularity: int
    members: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "width": self.width,
                "granularity": self.granularity, "members": [list(m) for m in self.members]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Group":
        return cls(d["kind"], d["layer"], d["width"], d["granularity"], tuple((m[0], m[1]) for m in d["members"]))



def unit_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one unit (one index of the outermost axis) of a storage tensor."""
    return math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()


def kept_units(entry: Mapping, widths: Mapping[str, int]) -> int:
    if not entry["group"]:
        return entry["storage_shape"][0]
    return widths[entry["group"]] // entry.get("unit_channels", 1)


def kept_bytes(entry: Mapping, widths: Mapping[str, int]) -> int:
    return kept_units(entry, widths) * unit_bytes(entry["storage_shape"], TORCH_DTYPES[entry["dtype"]])


def kv_bytes_per_token(groups: Iterable[Group], widths: Mapping[str, int], heads: Heads | None,
                       itemsize: int) -> int:
    """KV-cache bytes per token at ``widths``: per attention layer (one with a V/O or q/k group:
    every family with attention offers V/O rank; a hybrid's MLP or mixer layers hold no cache) and
    KV head, 2 channels per kept rotary pair in K plus the kept V rank (the whole head size where a
    layer has no such group); 0 for a model without attention (``heads`` None)."""
    if heads is None:
        return 0
    per_layer: dict[int, dict[str, int]] = {}
    for g in groups:
        if g.kind not in (QK, VO):
            continue
        per_layer.setdefault(g.layer, {QK: heads.head_dim, VO: heads.head_dim})
        if g.kind == QK:
            per_layer[g.layer][QK] = 2 * widths[g.name]
        elif g.kind == VO:
            per_layer[g.layer][VO] = widths[g.name]
    return sum(k + v for k, v in (layer.values() for layer in per_layer.values())) * heads.num_kv_heads * itemsize

# --- what a value may be ------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _fail(where: str, value: Any, expected: str):
    raise CheckpointError(f"manifest field {where} is {_show(value)}; expected {expected}")


def _is_int(v: Any, lo: int = 0, hi: int = MAX_DIM) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _in(choices) -> Callable[[Any], bool]:
    """Whether a value is one of the strings ``choices`` (an unhashable value is not)."""
    return lambda v: isinstance(v, str) and v in choices


def _ints(v: Any, lo: int = 0, hi: int = MAX_DIM) -> bool:
    return isinstance(v, list) and all(_is_int(x, lo, hi) for x in v)


def _field(d: Mapping, key: str, where: str, ok: Callable[[Any], bool], expected: str,
           optional: bool = False) -> Any:
    """``d[key]`` once ``ok`` accepts it; a missing ``optional`` field is None."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if optional:
            return None
        raise CheckpointError(f"manifest field {path} is missing; expected {expected}")
    if not ok(d[key]):
        _fail(path, d[key], expected)
    return d[key]


def _only(d: Mapping, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        what = f"manifest field {where}" if where else "the manifest"
        raise CheckpointError(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(allowed)}")


# --- the manifest ---------------------------------------------------------------------------------

def validate_top(manifest: Any, versions: tuple[int, ...]) -> int:
    """Check what every version shares before anything else is read: an object of the elastiq
    format, a known ``format_version``, its fields and (version 3) its own sha256; returns the version."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"the manifest is {_show(manifest)}; expected a JSON object with the fields "
                              f"{', '.join(_TOP)}")
    version = manifest.get("format_version")
    if not _is_int(version) or version not in versions:
        raise CheckpointError(f"format version {_show(version)}; this elastiq reads versions "
                              f"{', '.join(map(str, versions[:-1]))} and {versions[-1]}: rebuild it with `elastiq "
                              "compress` (and `elastiq quantize`), or read it with the elastiq that wrote it")
    _field(manifest, "format", "", lambda v: v == FORMAT, json.dumps(FORMAT))
    _only(manifest, _TOP + ((DIGEST, FILES) if version >= 3 else ()), "")
    if version >= 3:
        recorded = _field(manifest, DIGEST, "", lambda v: isinstance(v, str) and _HEX64.fullmatch(v),
                          "64 lowercase hex digits")
        if recorded != digest(manifest):
            raise CheckpointError("manifest.json fails its sha256 check: its contents are not what was written "
                                  "(damaged in transfer or edited); copy the checkpoint again or rebuild it")
        _field(manifest, FILES, "", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and re.fullmatch(r"[\w.-]+", k) and k not in (".", "..", "manifest.json",
                                                                           "weights.safetensors")
            and isinstance(h, str) and _HEX64.fullmatch(h) for k, h in v.items()),
            "an object of {file name in the checkpoint folder: sha256}")
    for key in _TOP:
        if key not in manifest:
            raise CheckpointError(f"manifest field {key} is missing")
    heads = _field(manifest, "heads", "", lambda v: v is None or isinstance(v, dict),
                   "an object, or null for a model without attention")
    if heads is not None:
        _heads(heads)
    tensors = _field(manifest, "tensors", "", lambda v: isinstance(v, dict) and v, "a non-empty object")
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            _fail(f"tensors[{name!r}]", entry, "an object")
        if version == 1:  # the role a migration turns into a layout
            _field(entry, "role", f"tensors[{name!r}]", _in(V1_ROLES), f"one of {', '.join(V1_ROLES)}")
        _field(entry, "storage_shape", f"tensors[{name!r}]", lambda v: _ints(v) and v, "a list of sizes")
    return version


def _heads(heads: dict) -> None:
    _only(heads, ("num_heads", "num_kv_heads", "head_dim"), "heads")
    for key in ("num_heads", "num_kv_heads", "head_dim"):
        _field(heads, key, "heads", lambda v: _is_int(v, 1, 2 ** 20), "a positive integer")
    if heads["num_heads"] % heads["num_kv_heads"]:
        _fail("heads.num_kv_heads", heads["num_kv_heads"], f"a divisor of heads.num_heads ({heads['num_heads']})")
    if heads["head_dim"] % 2:
        _fail("heads.head_dim", heads["head_dim"], "an even number (rotary pairs)")


def validate(manifest: dict, header: Mapping, data_start: int, file_size: int) -> None:
    """Check a manifest (read by ``validate_top``, migrated to the current version) against itself
    and the safetensors ``header`` of a file of ``file_size`` bytes whose data starts at ``data_start``."""
    version = manifest["format_version"]
    heads = Heads(**manifest["heads"]) if manifest["heads"] is not None else None
    _source(manifest["source"])
    _field(manifest, "kv_cache_dtype", "", _in(KV_DTYPES), f"one of {', '.join(KV_DTYPES)}")
    _quantization(manifest["quantization"])
    groups = _groups(manifest["groups"])
    tensors = manifest["tensors"]
    for name, entry in tensors.items():
        _entry(name, entry, groups, header, data_start, file_size, version, TORCH_DTYPES)
    parts = _parts(tensors)
    _members(groups, tensors, parts)
    aliases = _field(manifest, "aliases", "", lambda v: isinstance(v, dict), "an object")
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in parts or alias in parts:
            _fail(f"aliases[{alias!r}]", target, "the name of a stored tensor (and an alias that is not one)")
    rates = _field(manifest, "rates", "", lambda v: isinstance(v, list) and v, "a non-empty list")
    typed = [Group.from_dict(g) for g in groups.values()]
    previous = -1.0
    for i, row in enumerate(rates):
        where = f"rates[{i}]"
        if not isinstance(row, dict):
            _fail(where, row, "an object")
        _only(row, ("rate", "widths", "weight_bytes", "kv_bytes_per_token", "quality"), where)
        rate = _field(row, "rate", where, lambda v: _is_number(v) and 0 <= v < 1 and v > previous,
                      f"a number in [0, 1), above the previous row's {previous}" if i else "a number in [0, 1)")
        previous = rate
        widths = _widths(row, where, groups, tensors)
        expected = sum(kept_bytes(e, widths) for e in tensors.values())
        _field(row, "weight_bytes", where, lambda v: v == expected and _is_int(v, 0, 2 ** 62),
               f"{expected}, the bytes its widths keep")
        kv = kv_bytes_per_token(typed, widths, heads, KV_DTYPES[manifest["kv_cache_dtype"]])
        _field(row, "kv_bytes_per_token", where, lambda v: v == kv and _is_int(v, 0, 2 ** 62),
               f"{kv}, what its widths keep of K and V")
        quality = row.get("quality")
        if quality is not None:
            _quality(quality, f"{where}.quality")


def _source(source: Any) -> None:
    if not isinstance(source, dict):
        _fail("source", source, "an object")
    for key in ("name", "model_type", "chat_template"):
        _field(source, key, "source", lambda v: v is None or isinstance(v, str), "a string or null", optional=True)
    # config.model_type may differ from model_type: a family that converts (Phi-3 runs as Mistral)
    _field(source, "config", "source", lambda v: isinstance(v, dict), "an object (the model's config)", optional=True)


def _quantization(quant: Any) -> None:
    if quant is None:
        return
    if not isinstance(quant, dict):
        _fail("quantization", quant, "an object, or null for a float checkpoint")
    formats = f"one of {', '.join(FORMATS)}"
    _field(quant, "format", "quantization", _in(FORMATS), formats)
    _field(quant, "embedding_format", "quantization", _in(FORMATS), formats, optional=True)
    _field(quant, "method", "quantization", lambda v: isinstance(v, str), "a string", optional=True)
    _field(quant, "q8_0_matrices", "quantization", lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
           "a list of strings (the kinds of block matrix kept at 8 bits)", optional=True)
    _field(quant, "order", "quantization", lambda v: isinstance(v, str), "a string", optional=True)
    _field(quant, "block", "quantization", lambda v: v == BLOCK, str(BLOCK), optional=True)


def _groups(groups: Any) -> dict[str, dict]:
    if not isinstance(groups, list):
        _fail("groups", groups, "a list")
    out = {}
    for i, g in enumerate(groups):
        where = f"groups[{i}]"
        if not isinstance(g, dict):
            _fail(where, g, "an object")
        _only(g, ("name", "kind", "layer", "width", "granularity", "members"), where)
        kind = _field(g, "kind", where, _in(KINDS), f"one of {', '.join(KINDS)}")
        layer = _field(g, "layer", where, lambda v: _is_int(v, 0, 2 ** 20), "a layer index")
        _field(g, "name", where, lambda v: v == f"layers.{layer}.{kind}" and v not in out,
               f"'layers.{layer}.{kind}', once")
        _field(g, "width", where, lambda v: _is_int(v, 1), "a positive integer")
        _field(g, "granularity", where, lambda v: _is_int(v, 1) and g["width"] % v == 0,
               f"a positive divisor of its width {g['width']}")
        _field(g, "members", where, lambda v: isinstance(v, list) and v and all(
            isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and m[1] != "whole" and known_role(m[1])
            for m in v),
            f"a non-empty list of [tensor name, role], a role one of {', '.join(ROLES[1:])}, rows/n or cols/n")
        out[g["name"]] = g
    return out


def _entry(name: str, e: dict, groups: Mapping[str, dict], header: Mapping, data_start: int, file_size: int,
           version: int, dtypes: Mapping[str, torch.dtype]) -> None:
    where = f"tensors[{name!r}]"
    _only(e, _ENTRY + (("role",) if version == 1 else ()), where)
    dtype = _field(e, "dtype", where, _in(dtypes), f"one of {', '.join(dtypes)}")
    shape = _field(e, "shape", where, lambda v: _ints(v) and v, "a non-empty list of sizes")
    storage = e["storage_shape"]
    channels = _field(e, "unit_channels", where, lambda v: _is_int(v, 1), "a positive integer", optional=True) or 1
    layout = _field(e, "layout", where, lambda v: v is None or isinstance(v, dict), "an object or null")
    if layout is None:
        if shape != storage:
            _fail(f"{where}.storage_shape", storage, f"{shape}, its shape (the tensor has no layout)")
    else:
        _layout(layout, shape, storage, f"{where}.layout")
    group = _field(e, "group", where, lambda v: v is None or _in(groups)(v), "null or the name of a group")
    segments = _field(e, "segments", where, lambda v: isinstance(v, list) and v and all(
        isinstance(s, list) and len(s) == 2 and _is_int(s[0], 1) and isinstance(s[1], str)
        and _HEX64.fullmatch(s[1]) for s in v), "a non-empty list of [end unit, sha256]")
    ends = [s[0] for s in segments]
    if ends != sorted(set(ends)) or ends[-1] != storage[0]:
        _fail(f"{where}.segments", ends, f"increasing end units, the last {storage[0]} (storage_shape[0])")
    if group is not None and storage[0] * channels != groups[group]["width"]:
        _fail(f"{where}.storage_shape", storage, f"{groups[group]['width'] // channels} units first "
              f"({groups[group]['width']} channels of group {group}, {channels} a unit)")
    part = _field(e, "part", where, lambda v: v in ("codes", "scales"), "'codes' or 'scales'", optional=True)
    if (part is None) != ("part_of" not in e):
        _fail(f"{where}.part_of" if part else f"{where}.part", None, "present with part (or part_of)")
    if part is not None:
        _field(e, "part_of", where, lambda v: isinstance(v, str) and v, "the name of its quantized tensor")
        _field(e, "format", where, _in(FORMATS), f"one of {', '.join(FORMATS)}", optional=True)
    elif "format" in e:
        _fail(f"{where}.format", e["format"], "absent: only a quantized tensor's parts have a format")
    stored = header.get(name)
    if not isinstance(stored, dict):
        raise CheckpointError(f"tensor {name} is in the manifest but not in weights.safetensors")
    if stored.get("dtype") != dtype or stored.get("shape") != storage:
        raise CheckpointError(f"tensor {name}: weights.safetensors stores {_show(stored.get('dtype'))} "
                              f"{_show(stored.get('shape'))}, the manifest says {dtype} {storage}")
    offsets = stored.get("data_offsets")
    size = math.prod(storage) * torch.empty((), dtype=dtypes[dtype]).element_size()
    if not (_ints(offsets, 0, 2 ** 62) and len(offsets) == 2 and offsets[1] - offsets[0] == size):
        raise CheckpointError(f"tensor {name}: weights.safetensors gives data_offsets {_show(offsets)}; "
                              f"expected a range of {size} bytes")
    if data_start + offsets[1] > file_size:
        raise CheckpointError(f"weights.safetensors is truncated: tensor {name} ends at byte "
                              f"{data_start + offsets[1]}, the file has {file_size}")


def _layout(layout: dict, shape: list[int], storage: list[int], where: str) -> None:
    _only(layout, ("axis", "split", "perm"), where)
    axis = _field(layout, "axis", where, lambda v: _is_int(v, 0, len(shape) - 1), f"an axis of {shape}")
    split = _field(layout, "split", where, lambda v: isinstance(v, list) and v.count(-1) == 1 and all(
        x == -1 or _is_int(x, 1) for x in v), "a list of factors with one -1 (the units)")
    n = len(shape) + len(split) - 1
    _field(layout, "perm", where, lambda v: _ints(v) and sorted(v) == list(range(n)) and v[0] == axis + split.index(-1),
           f"a permutation of 0..{n - 1} that puts the units (axis {axis + split.index(-1)}) first")
    try:
        held = Layout.from_dict(layout).from_storage(torch.empty(storage, device="meta"))
    except RuntimeError:
        held = None
    if held is None or list(held.shape) != shape:
        _fail(f"{where}", layout, f"a layout taking storage_shape {storage} to shape {shape}")


def _parts(tensors: Mapping[str, dict]) -> dict[str, dict[str, dict]]:
    """{model tensor: {part: entry}}, each quantized tensor with codes and scales of one format and group."""
    parts: dict[str, dict[str, dict]] = {}
    for stored, e in tensors.items():
        parts.setdefault(e.get("part_of", stored), {})[e.get("part", "")] = e
    for name, p in parts.items():
        if set(p) not in ({""}, {"codes", "scales"}):
            raise CheckpointError(f"tensor {name} is stored as part(s) {sorted(p)}; expected one float tensor, or "
                                  "'codes' and 'scales'")
        if "codes" in p:
            codes, scales = p["codes"], p["scales"]
            same = ("format", "group", "unit_channels")
            if any(codes.get(k) != scales.get(k) for k in same) or codes["shape"][:-1] != scales["shape"]:
                raise CheckpointError(f"tensor {name}: its codes and scales disagree on {', '.join(same)} or shape")
            dtype, width = _CODES[codes.get("format", "q4_0")]
            if (codes["dtype"], codes["shape"][-1], scales["dtype"], len(scales["shape"])) != (dtype, width, "F16", 2):
                raise CheckpointError(f"tensor {name}: {codes.get('format', 'q4_0')} codes are {dtype} [out, in/32, "
                                      f"{width}] and scales F16 [out, in/32]; the manifest says {codes['dtype']} "
                                      f"{codes['shape']} and {scales['dtype']} {scales['shape']}")
    return parts


def _members(groups: Mapping[str, dict], tensors: Mapping[str, dict], parts: Mapping[str, dict]) -> None:
    member_of = {}
    for g in groups.values():
        for tensor, _ in g["members"]:
            if tensor not in parts:
                raise CheckpointError(f"group {g['name']} names tensor {tensor}, which is not stored")
            member_of[tensor] = g["name"]
    for name, p in parts.items():
        for e in p.values():
            if e["group"] != member_of.get(name):
                raise CheckpointError(f"tensor {name} says group {_show(e['group'])}; the groups make it a member of "
                                      f"{_show(member_of.get(name))}")


def _widths(row: dict, where: str, groups: Mapping[str, dict], tensors: Mapping[str, dict]) -> dict[str, int]:
    widths = _field(row, "widths", where, lambda v: isinstance(v, dict) and set(v) == set(groups),
                    "an object with a kept width for every group")
    for name, w in widths.items():
        g = groups[name]
        if w != g["width"] and not (_is_int(w, 1, g["width"] - 1) and w % g["granularity"] == 0):
            _fail(f"{where}.widths[{name!r}]", w, f"{g['width']} or a multiple of {g['granularity']} below it")
    for name, e in tensors.items():
        if e["group"] is not None:
            w, channels = widths[e["group"]], e.get("unit_channels", 1)
            if w % channels or (w // channels not in [s[0] for s in e["segments"]]):
                raise CheckpointError(f"{where}: tensor {name} cannot be cut to width {w} of group {e['group']} "
                                      "on its segment ends")
    return widths


def _quality(quality: Any, where: str) -> None:
    measured = lambda ok: lambda v: _is_number(v) and (math.isnan(v) or ok(v))  # noqa: E731 (NaN: a diverged rate)
    checks = {"heldout_ppl": measured(lambda v: v > 0), "kl_mean": measured(lambda v: v >= 0),
              "kl_p99": measured(lambda v: v >= 0), "top1_agreement": measured(lambda v: 0 <= v <= 1),
              "tokens": lambda v: _is_int(v, 1, 2 ** 62)}
    if not isinstance(quality, dict):
        _fail(where, quality, "an object of measured quality, or null")
    _only(quality, tuple(QUALITY), where)
    for key, ok in checks.items():
        _field(quality, key, where, ok, QUALITY[key])

"""The nested checkpoint: its one writer and one reader (specified in docs/format.md).

A checkpoint is a folder ``NAME.elastiq/`` with ``manifest.json``, ``weights.safetensors`` and
the tokenizer files. Every tensor of a prunable group is stored with its pruned unit outermost
(MLP channel, rotary pair per KV head, V/O rank per KV head), so the part a rate keeps is one
contiguous byte prefix; the manifest says how as data (``layouts.Layout``), so the reader knows
no model family and no role. Each tensor is hashed per *segment*, the units between two consecutive
widths that some offered rate keeps, so that loading a rate reads and verifies exactly its bytes,
and growing to a larger rate reads and verifies only the missing segments.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .atomic import atomic_path, resumable_path, write_text
from .layouts import ADDED_DIMS, Layout, head_counts, is_input_role, role_layout
from .manifest import (DIGEST, DTYPES, FILES, MLP, QK, SSM_N, SSM_P, VO, TORCH_DTYPES,  # noqa: F401
                       CheckpointError, Group, Heads, digest, kept_bytes, kept_units, kv_bytes_per_token, unit_bytes,
                       validate, validate_top)
# (MLP, QK, VO, SSM_P, SSM_N: the group kinds, which the checkpoint's users import from here with Group and Heads)
from .quants import BLOCK, FORMAT_NAMES, FORMATS, Quantized

FORMAT_VERSION = 3  # 3: the manifest's and tokenizer files' sha256; 2: each tensor's layout as data
# (1: a role name, read through _migrate_v1)
READS = (1, 2, 3)
MAX_MANIFEST = 256 * 2 ** 20  # bytes: a manifest (and a safetensors header) larger than this is refused unread
SUFFIX = ".elastiq"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


# --- the manifest's parts (more in manifest.py) ------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from (the manifest's ``source``): the model's name and
    ``model_type``, its Hugging Face config dict, its chat template, and ``record``, the whole
    section as written (with each stage's settings: ``compression``, ``recovery``...), which a
    later stage copies forward."""

    name: str | None
    model_type: str | None
    config: Mapping
    chat_template: str | None
    record: Mapping

    @classmethod
    def from_dict(cls, d: Mapping) -> "Source":
        return cls(d.get("name"), d.get("model_type"), d.get("config") or {}, d.get("chat_template"), d)


@dataclass(frozen=True)
class RateSpec:
    """One offered rate: kept width per group, and quality measured at compression time, if any."""

    rate: float
    widths: Mapping[str, int]
    quality: Mapping[str, float] | None = None


# --- the writer ----------------------------------------------------------------------------------

def _parts(name: str, t: torch.Tensor | Quantized, role: str) -> list[tuple[str, torch.Tensor, int, dict]]:
    """What is stored for one model tensor: (stored name, tensor, channels per unit, manifest
    fields). A float tensor is one part; a quantized matrix (Q4_0 or Q8_0) is its codes and its
    scales, which take the matrix's layout: pruned in whole blocks where the role prunes its input."""
    if not isinstance(t, Quantized):
        return [(name, t, 1, {})]
    unit = BLOCK if is_input_role(role) else 1
    fmt = FORMAT_NAMES[type(t)]
    prefix = f"{name}.{fmt.split('_')[0]}"  # q4 / q8
    return [(f"{prefix}_codes", t.codes, unit, {"part_of": name, "part": "codes", "format": fmt}),
            (f"{prefix}_scales", t.scales, unit, {"part_of": name, "part": "scales", "format": fmt})]


def checkpoint_output(output: str | Path, overwrite: bool, error: type[Exception] = CheckpointError) -> Path:
    """``output`` as a path a writer may fill: a folder named *.elastiq, absent unless ``overwrite``."""
    output = Path(output)
    if output.suffix != SUFFIX:
        raise error(f"the output must be a folder named *{SUFFIX}, got {output}")
    if output.exists() and not overwrite:
        raise error(f"{output} exists; pass --overwrite to replace it")
    return output


def write_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor | Quantized], groups: Sequence[Group],
                     rates: Sequence[RateSpec], heads: Heads | None, source: Mapping, tokenizer=None,
                     kv_cache_dtype: torch.dtype = torch.bfloat16, quantization: Mapping | None = None,
                     overwrite: bool = False) -> Path:
    """Write a nested checkpoint of the sorted full-width model ``tensors`` (Hugging Face names;
    a matrix may be a ``QuantizedTensor`` or a ``Q8Tensor``, described by ``quantization`` in the manifest).

    The folder is assembled under a temporary name beside ``path`` and renamed into place, so an
    interrupted write leaves no checkpoint behind. ``CheckpointWriter`` writes the same, one
    tensor at a time.
    """
    tensors, aliases = _dedupe(tensors)
    with CheckpointWriter(path, {name: _meta(t) for name, t in tensors.items()}, groups, heads, aliases,
                          overwrite) as writer:
        for name, t in tensors.items():
            writer.put(name, t)
        writer.finish(rates, source, tokenizer, kv_cache_dtype, quantization)
    return Path(path)


def _meta(t: torch.Tensor | Quantized) -> torch.Tensor | Quantized:
    """``t``'s shape and dtype without its data (a quantized matrix's parts alike)."""
    if isinstance(t, Quantized):
        return type(t)(t.codes.to("meta"), t.scales.to("meta"))
    return t.detach().to("meta")


_ALIGN = 8  # safetensors pads its header so that the data starts on 8 bytes


class CheckpointWriter:
    """Writes a nested checkpoint one tensor at a time, so that a model never has to be whole in
    memory (the compressor puts each block as it finishes it).

    ``plan`` gives every tensor to be stored, by name, as a tensor or ``Quantized`` matrix on the
    meta device (its shape and dtype); ``aliases`` the names stored under another's bytes. The
    weights file is laid out from the plan when the writer opens, ``put`` writes a tensor's bytes
    at its place, in any order, and ``finish`` hashes every segment by reading the file back
    (the offered rates, which decide the segments, may be known only then) and writes the
    manifest. Everything is written into a temporary folder renamed to ``path`` when the ``with``
    block ends after ``finish``; an error, or a block left without ``finish``, leaves nothing.

    With ``resume``, that folder is ``resume``/NAME instead, and it outlives an error or a kill
    (``atomic.resumable_path``): a writer of the same plan opened on it again keeps the tensors
    already put (recorded in NAME.written.json beside it, each once its bytes are written), so a
    caller that lost its process puts only the rest.
    """

    def __init__(self, path: Path, plan: Mapping[str, torch.Tensor | Quantized], groups: Sequence[Group],
                 heads: Heads | None, aliases: Mapping[str, str] | None = None, overwrite: bool = False,
                 resume: Path | None = None):
        self.path, self.resume = Path(path), resume
        if self.path.suffix != SUFFIX:
            raise CheckpointError(f"a checkpoint folder's name must end in {SUFFIX}, got {self.path.name}")
        if self.path.exists() and not overwrite:
            raise CheckpointError(f"{self.path} exists; pass overwrite=True (--overwrite) to replace it")
        self.groups, self.heads, self.aliases = list(groups), heads, dict(aliases or {})
        self._roles = {name: (g, role) for g in self.groups for name, role in g.members}
        missing = sorted(set(self._roles) - set(plan))
        if missing:
            raise CheckpointError(f"group tensors missing from the model: {', '.join(missing[:5])}")
        self._plan = dict(plan)
        self.entries: dict[str, dict] = {}
        self._layouts: dict[str, Layout | None] = {}
        for name, tensor in self._plan.items():
            group, role = self._roles.get(name, (None, "whole"))
            for stored, t, channels, fields in _parts(name, tensor, role):
                if t.dim() == 0 or t.dtype not in DTYPES:
                    raise CheckpointError(f"tensor {stored} ({t.dtype}, {t.dim()}-d) cannot be stored; supported: "
                                          f"tensors of 1 or more dimensions in {', '.join(DTYPES.values())}")
                layout = role_layout(role, *head_counts(heads), t.dim())
                s = t if layout is None else layout.to_storage(t)
                if group and s.shape[0] * channels != group.width:
                    raise CheckpointError(f"tensor {stored} has {s.shape[0] * channels} channels on its pruned axis, "
                                          f"group {group.name} says {group.width}")
                self._layouts[stored] = layout
                self.entries[stored] = {"layout": layout.to_dict() if layout else None,
                                        "group": group.name if group else None, "dtype": DTYPES[s.dtype],
                                        "shape": list(t.shape), "storage_shape": list(s.shape),
                                        "unit_channels": channels, "segments": [], **fields}
        self._written: set[str] = set()
        self._finished = False
        self._fd: int | None = None

    def __enter__(self) -> "CheckpointWriter":
        # resumable: the folder outlives an error (``resumable_path``); else a temporary a kill removes
        self._folder = atomic_path(self.path, directory=True) if self.resume is None else \
            resumable_path(self.path, self.resume)
        self._tmp = self._folder.__enter__()
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._open_weights()
        except BaseException as err:
            self._folder.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if self._fd is not None:
            os.close(self._fd)
        if err is None and not self._finished:
            err = CheckpointError(f"the checkpoint writer of {self.path} was closed before finish(); nothing "
                                  "was written under that name")
            if not self._folder.__exit__(type(err), err, None):
                raise err
            return False
        if err is None and self.resume is not None:
            self._record.unlink(missing_ok=True)
        return bool(self._folder.__exit__(kind, err, tb))

    @property
    def _record(self) -> Path:
        """Where a resumable writer records the tensors it has put."""
        return self._tmp.with_name(self._tmp.name + ".written.json")

    def _open_weights(self) -> None:
        """Lay the weights file out: its safetensors header, then every stored tensor's bytes (the
        file is sized at once; ``put`` fills it). A resumable writer keeps a file of the same
        layout, and the record of what it holds."""
        header: dict = {"__metadata__": {"format": "elastiq"}}
        self._offsets, offset = {}, 0
        for stored, entry in self.entries.items():
            dtype = TORCH_DTYPES[entry["dtype"]]
            size = unit_bytes(entry["storage_shape"], dtype) * entry["storage_shape"][0]
            header[stored] = {"dtype": entry["dtype"], "shape": entry["storage_shape"],
                              "data_offsets": [offset, offset + size]}
            self._offsets[stored] = offset
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % _ALIGN)
        self._data_start = 8 + len(text)
        head, file = struct.pack("<Q", len(text)) + text, self._tmp / WEIGHTS
        if self.resume is not None and file.is_file() and file.stat().st_size == self._data_start + offset:
            self._fd = os.open(file, os.O_RDWR)
            if os.pread(self._fd, len(head), 0) == head:  # the same layout: what was put is still there
                if self._record.is_file():
                    self._written = set(json.loads(self._record.read_text())) & set(self.entries)
                return
            os.close(self._fd)
        self._fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        _pwrite(self._fd, head, 0)
        os.ftruncate(self._fd, self._data_start + offset)
        if self.resume is not None:
            self._record.unlink(missing_ok=True)

    def put(self, name: str, tensor: torch.Tensor | Quantized) -> None:
        """Write the bytes of planned tensor ``name`` (its shape and dtype as planned)."""
        if name not in self._plan:
            raise CheckpointError(f"tensor {name} is not in the checkpoint's plan")
        group, role = self._roles.get(name, (None, "whole"))
        for stored, t, _, _ in _parts(name, tensor, role):
            entry, layout = self.entries.get(stored), self._layouts.get(stored)
            t = t.detach().cpu()
            if entry is None or list(t.shape) != entry["shape"] or DTYPES.get(t.dtype) != entry["dtype"]:
                raise CheckpointError(f"tensor {stored} is {t.dtype} {list(t.shape)}; the plan says "
                                      f"{entry and entry['dtype']} {entry and entry['shape']}")
            s = t.contiguous() if layout is None else layout.to_storage(t).contiguous()
            _pwrite(self._fd, s.reshape(-1).view(torch.uint8).numpy(), self._data_start + self._offsets[stored])
            self._written.add(stored)
        if self.resume is not None:
            write_text(self._record, json.dumps(sorted(self._written)))

    def finish(self, rates: Sequence[RateSpec], source: Mapping, tokenizer=None,
               kv_cache_dtype: torch.dtype = torch.bfloat16, quantization: Mapping | None = None) -> None:
        """Hash every tensor's segments for the offered ``rates`` and write the manifest (and the
        tokenizer's files)."""
        if unwritten := [s for s in self.entries if s not in self._written]:
            raise CheckpointError(f"{len(unwritten)} planned tensors were never written, as {unwritten[0]}")
        _check_rates(self.groups, rates)
        for stored, entry in self.entries.items():
            shape = entry["storage_shape"]
            ends = [shape[0]]
            if entry["group"]:
                ends = sorted({r.widths[entry["group"]] // entry["unit_channels"] for r in rates} | {shape[0]})
            unit, start, segments = unit_bytes(shape, TORCH_DTYPES[entry["dtype"]]), 0, []
            for end in (e for e in ends if e > 0):
                offset = self._data_start + self._offsets[stored]
                segments.append([end, _range_sha256(self._fd, offset + start * unit, offset + end * unit)])
                start = end
            entry["segments"] = segments
        kv_size = torch.empty((), dtype=kv_cache_dtype).element_size()
        rate_table = []
        for r in sorted(rates, key=lambda r: r.rate):
            rate_table.append({"rate": r.rate, "widths": dict(r.widths),
                               "weight_bytes": sum(kept_bytes(e, r.widths) for e in self.entries.values()),
                               "kv_bytes_per_token": kv_bytes_per_token(self.groups, r.widths, self.heads, kv_size),
                               "quality": dict(r.quality) if r.quality else None})
        heads = self.heads
        manifest = {
            "format": "elastiq-nested-checkpoint", "format_version": FORMAT_VERSION,
            "source": dict(source),
            "heads": ({"num_heads": heads.num_heads, "num_kv_heads": heads.num_kv_heads, "head_dim": heads.head_dim}
                      if heads else None),
            "kv_cache_dtype": str(kv_cache_dtype).removeprefix("torch."),
            "quantization": dict(quantization) if quantization else None,
            "groups": [g.to_dict() for g in self.groups],
            "rates": rate_table,
            "tensors": self.entries,
            "aliases": self.aliases,
        }
        if tokenizer is not None:
            tokenizer.save_pretrained(self._tmp)
        manifest[FILES] = {f.name: _file_sha256(f) for f in sorted(self._tmp.iterdir())
                          if f.name not in (WEIGHTS, MANIFEST)}
        (self._tmp / MANIFEST).write_text(_manifest_text(manifest))
        self._finished = True


def _pwrite(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (bytes or a uint8 array) at ``offset`` of the open file ``fd``."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _range_sha256(fd: int, start: int, end: int, chunk: int = 2 ** 24) -> str:
    """sha256 of bytes [start, end) of the open file ``fd``, read back in chunks."""
    h = hashlib.sha256()
    while start < end:
        data = os.pread(fd, min(chunk, end - start), start)
        if not data:
            raise CheckpointError(f"{WEIGHTS} ended at byte {start} while being hashed")
        h.update(data)
        start += len(data)
    return h.hexdigest()


def _manifest_text(manifest: dict) -> str:
    """``manifest`` as its file holds it, with its own sha256 (``manifest.digest``)."""
    manifest[DIGEST] = digest(manifest)
    return json.dumps(manifest, indent=1)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2 ** 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_quality(ckpt: Checkpoint, quality: Mapping[float, Mapping[str, float]]) -> None:
    """Fill the rate table's ``quality`` of the open checkpoint ``ckpt`` (measured once it was
    written, by reading it back), in memory and on disk; the manifest is replaced whole, so a reader
    sees it before or after."""
    manifest = ckpt.manifest
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt.path} has format version {manifest['format_version']}; quality is recorded "
                              f"in checkpoints of version {FORMAT_VERSION}, as elastiq writes them now")
    for row in manifest["rates"]:
        if row["rate"] in quality:
            row["quality"] = dict(quality[row["rate"]])
    write_text(ckpt.path / MANIFEST, _manifest_text(manifest))


def _dedupe(tensors: Mapping[str, torch.Tensor | Quantized]) -> tuple[dict, dict[str, str]]:
    """Store tied tensors (the same memory under two names, as a tied lm_head) once:
    returns the tensors to store and {alias: stored name}."""
    stored, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        first = t.codes if isinstance(t, Quantized) else t
        key = (first.data_ptr(), tuple(first.shape), tuple(first.stride()), first.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            stored[name] = t
    return stored, aliases


def _check_rates(groups: Sequence[Group], rates: Sequence[RateSpec]) -> None:
    if not rates:
        raise CheckpointError("a checkpoint offers at least one rate")
    seen = set()
    for r in rates:
        if not 0 <= r.rate < 1:
            raise CheckpointError(f"rate {r.rate} is outside [0, 1)")
        if r.rate in seen:
            raise CheckpointError(f"rate {r.rate} is offered twice")
        seen.add(r.rate)
        for g in groups:
            w = r.widths.get(g.name)
            if w != g.width and (w is None or not 0 < w < g.width or w % g.granularity):
                raise CheckpointError(f"rate {r.rate}: group {g.name} needs a kept width of {g.width} or a "
                                      f"multiple of {g.granularity} below it, got {w}")


def _to_storage(t: torch.Tensor, entry: Mapping) -> torch.Tensor:
    layout = entry.get("layout")
    return t.contiguous() if layout is None else Layout.from_dict(layout).to_storage(t)


def _from_storage(s: torch.Tensor, entry: Mapping) -> torch.Tensor:
    layout = entry.get("layout")
    return s if layout is None else Layout.from_dict(layout).from_storage(s)


def _form(s: torch.Tensor, entry: Mapping, unit_order: bool) -> torch.Tensor:
    """Storage units ``s`` in the tensor's own form, its pruned axis in unit order or not."""
    layout = entry.get("layout")
    if layout is None or not unit_order:
        return _from_storage(s, entry)
    return Layout.from_dict(layout).in_unit_order(s)


def _per_unit(entry: Mapping) -> int:
    """Positions of a pruned axis per unit (a quantized part's input axis: blocks of 32 channels)."""
    return entry["shape"][int(entry["layout"]["axis"])] // entry["storage_shape"][0]


def _migrate_v1(manifest: dict, heads: Heads) -> None:
    """Read a version 1 manifest as version 2, in memory: each tensor's role name becomes its
    layout (a quantized part's ``cols_blocks`` / ``o_blocks`` is its matrix's ``cols`` / ``o``)."""
    for entry in manifest["tensors"].values():
        role = {"cols_blocks": "cols", "o_blocks": "o"}.get(entry["role"], entry["role"])
        ndim = len(entry["storage_shape"]) - ADDED_DIMS.get(role, 0)
        layout = role_layout(role, heads.num_heads, heads.num_kv_heads, ndim)
        entry["layout"] = layout.to_dict() if layout else None


# --- the reader ----------------------------------------------------------------------------------

def _parse_json(raw: bytes, what: str):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{what}: not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{what}: JSON nested too deeply") from None


def _read_json(file: Path, what: str, missing: str):
    """The JSON document in ``file``, refused unread beyond ``MAX_MANIFEST`` bytes."""
    if not file.is_file():
        raise CheckpointError(f"{missing} (no {file.name})")
    size = file.stat().st_size
    if size > MAX_MANIFEST:
        raise CheckpointError(f"{file} is {size} bytes; a {what} of more than {MAX_MANIFEST} bytes is refused")
    return _parse_json(file.read_bytes(), f"{file} is not a valid {what}")


class Checkpoint:
    """An open nested checkpoint: its manifest, and reads of exactly one rate's bytes."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.manifest = _read_json(self.path / MANIFEST, "manifest", f"{self.path} is not a nested checkpoint")
        self._weights = self.path / WEIGHTS
        try:
            version = validate_top(self.manifest, READS)
            h = self.manifest["heads"]
            self.heads = Heads(h["num_heads"], h["num_kv_heads"], h["head_dim"]) if h is not None else None
            if version == 1:
                _migrate_v1(self.manifest, self.heads)
            header, data_start, size = self._read_header()
            validate(self.manifest, header, data_start, size)
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {err}") from None
        self._check_files()
        self.source = Source.from_dict(self.manifest["source"])
        self.quantization: Mapping | None = self.manifest["quantization"]  # None: a float checkpoint
        self.groups = [Group.from_dict(g) for g in self.manifest["groups"]]
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        self.bytes_read = 0
        self._offsets = {name: tuple(data_start + o for o in header[name]["data_offsets"]) for name in self.tensors}
        self._parts = self._stored_parts()

    @property
    def config(self) -> Mapping:
        """The source model's Hugging Face config dict."""
        return self.source.config

    @property
    def rates(self) -> list[float]:
        return [r["rate"] for r in self.manifest["rates"]]

    @property
    def rate_table(self) -> list[dict]:
        """Every offered rate's row (rate, widths, weight and KV bytes, measured quality), smallest rate first."""
        return list(self.manifest["rates"])

    def rate_entry(self, rate: float) -> dict:
        """The rate table's row of an offered rate (an error lists the offered ones)."""
        for r in self.manifest["rates"]:
            if abs(r["rate"] - rate) < 1e-9:
                return r
        raise CheckpointError(f"rate {rate} is not offered by {self.path.name}; offered: "
                              f"{', '.join(str(r) for r in self.rates)}")

    def _read_header(self) -> tuple[dict, int, int]:
        """The safetensors header of the weights file, where its data starts, and the file's size."""
        if not self._weights.is_file():
            raise CheckpointError(f"{WEIGHTS} is missing")
        size = self._weights.stat().st_size
        with open(self._weights, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{WEIGHTS} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_MANIFEST):
                raise CheckpointError(f"{WEIGHTS} has a corrupted safetensors header: it claims {n} bytes of "
                                      f"header in a file of {size}")
            header = _parse_json(f.read(n), f"{WEIGHTS} has a corrupted safetensors header")
        if not isinstance(header, dict):
            raise CheckpointError(f"{WEIGHTS} has a corrupted safetensors header (not a JSON object)")
        return header, 8 + n, size

    def _check_files(self) -> None:
        """The sha256 of every file the manifest lists (the tokenizer's), read once at opening."""
        for name, expected in self.manifest.get(FILES, {}).items():
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file} is missing; the manifest lists it")
            if _file_sha256(file) != expected:
                raise CheckpointError(f"{file} fails its sha256 check; {self.path.name} is corrupted: copy it "
                                      "again or rebuild it")

    def read_units(self, name: str, start: int, end: int, verify: bool = True) -> torch.Tensor:
        """Storage units [start, end) of tensor ``name``; ``start`` and ``end`` lie on segment ends.
        The bytes are read straight into the returned tensor's memory (no second copy)."""
        entry = self.tensors[name]
        dtype = TORCH_DTYPES[entry["dtype"]]
        shape = entry["storage_shape"]
        unit = unit_bytes(shape, dtype)
        buf = torch.empty((end - start) * unit, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        with open(self._weights, "rb") as f:
            f.seek(self._offsets[name][0] + start * unit)
            got = f.readinto(view)
        if got != len(view):
            raise CheckpointError(f"tensor {name}: {WEIGHTS} ended after {got} of {len(view)} bytes; it is truncated")
        self.bytes_read += got
        if verify:
            self._verify(name, entry, view, start, end, unit)
        return buf.view(dtype).reshape(end - start, *shape[1:])

    def _verify(self, name: str, entry: dict, raw: memoryview, start: int, end: int, unit: int) -> None:
        seg_start = 0
        for seg_end, expected in entry["segments"]:
            if seg_start >= start and seg_end <= end:
                chunk = raw[(seg_start - start) * unit:(seg_end - start) * unit]
                if hashlib.sha256(chunk).hexdigest() != expected:
                    raise CheckpointError(f"tensor {name}: units [{seg_start}, {seg_end}) fail their sha256 "
                                          f"check; {self.path.name} is corrupted")
            elif seg_start < end and seg_end > start:
                raise CheckpointError(f"tensor {name}: units [{start}, {end}) do not lie on segment ends")
            seg_start = seg_end

    def _stored_parts(self) -> dict[str, dict[str, str]]:
        """{model tensor name: {part: stored name}}, in the stored order; a float tensor is its own
        single part ``""``, a quantized matrix has parts ``codes`` and ``scales``."""
        parts: dict[str, dict[str, str]] = {}
        for stored, entry in self.tensors.items():
            parts.setdefault(entry.get("part_of", stored), {})[entry.get("part", "")] = stored
        return parts

    def format(self, name: str) -> str | None:
        """The code format of model tensor ``name`` ("q4_0", "q8_0"), None for a float tensor."""
        return self._format(self._parts[self.manifest["aliases"].get(name, name)])

    def _format(self, stored: Mapping[str, str]) -> str | None:
        return None if "" in stored else self.tensors[stored["codes"]].get("format", "q4_0")

    def _assemble(self, name: str, stored: Mapping[str, str],
                  parts: Mapping[str, torch.Tensor]) -> torch.Tensor | Quantized:
        if "" in parts:
            return parts[""]
        fmt = self._format(stored)
        if fmt not in FORMATS:
            raise CheckpointError(f"tensor {name} is stored as {fmt!r}; this elastiq reads {', '.join(FORMATS)}")
        return FORMATS[fmt](parts["codes"], parts["scales"])

    def iter_rate(self, rate: float, verify: bool = True,
                  unit_order: bool = False) -> Iterator[tuple[str, torch.Tensor | Quantized]]:
        """The model at ``rate``, one tensor at a time in Hugging Face form (pruned axes cut;
        quantized matrices as ``QuantizedTensor`` or ``Q8Tensor``), reading only its bytes; an alias
        of a tied tensor comes last and is the same object as the tensor it names. Loading tensor by
        tensor keeps one tensor's raw bytes in memory at a time. With ``unit_order``, each pruned
        axis comes in unit order (``layouts.Layout.in_unit_order``: every rate a prefix of it)."""
        yielded = {}
        for name in self._parts:
            t = self.read_tensor(name, rate, verify, unit_order)
            if name in self.manifest["aliases"].values():
                yielded[name] = t
            yield name, t
        for alias, name in self.manifest["aliases"].items():
            yield alias, yielded[name]

    def read_tensor(self, name: str, rate: float, verify: bool = True,
                    unit_order: bool = False) -> torch.Tensor | Quantized:
        """Stored model tensor ``name`` (not an alias) at ``rate``, as ``iter_rate`` gives it."""
        widths, stored = self.rate_entry(rate)["widths"], self._parts[name]
        parts = {part: _form(self.read_units(s, 0, kept_units(self.tensors[s], widths), verify),
                             self.tensors[s], unit_order) for part, s in stored.items()}
        return self._assemble(name, stored, parts)

    def unit_axis(self, name: str) -> int | None:
        """The pruned axis of model tensor ``name`` (None: it is not pruned)."""
        layout = self.tensors[self._first_part(name)].get("layout")
        return None if layout is None else int(layout["axis"])

    def unit_order(self, name: str, rate: float) -> torch.Tensor | None:
        """Where each position of model tensor ``name``'s pruned axis at ``rate``, in unit order,
        comes from in the tensor's own order (``Layout.unit_order``); a quantized matrix's input
        axis in channels (32 per block). None: the tensor is not pruned, or its unit order is its own."""
        entry = self.tensors[self._first_part(name)]
        if entry.get("layout") is None or len(entry["layout"]["split"]) == 1:  # one factor: positions stay in order
            return None
        layout = Layout.from_dict(entry["layout"])
        length = kept_units(entry, self.rate_entry(rate)["widths"]) * _per_unit(entry)
        order = layout.unit_order(length)
        if torch.equal(order, torch.arange(length)):
            return None
        if "codes" in self._parts[name] and layout.axis == 1:
            order = (order[:, None] * BLOCK + torch.arange(BLOCK)).flatten()
        return order

    def read_span(self, name: str, start: int, end: int, verify: bool = True) -> torch.Tensor | Quantized:
        """Positions [start, end) of model tensor ``name``'s pruned axis in unit order (a quantized
        matrix's input axis in channels), reading only them: what growing a held tensor from one
        rate's width (``start``) to a wider rate's (``end``) needs."""
        stored = self._parts[name]
        quantized_input = "codes" in stored and self.unit_axis(name) == 1
        parts = {}
        for part, s in stored.items():
            entry = self.tensors[s]
            per_unit = _per_unit(entry) * (BLOCK if quantized_input else 1)
            if start % per_unit or end % per_unit:
                raise CheckpointError(f"tensor {name}: [{start}, {end}) is not whole units of {per_unit}")
            parts[part] = _form(self.read_units(s, start // per_unit, end // per_unit, verify), entry, True)
        return self._assemble(name, stored, parts)

    def _first_part(self, name: str) -> str:
        stored = self._parts[self.manifest["aliases"].get(name, name)]
        return stored["codes" if "codes" in stored else ""]

    def shapes(self, rate: float) -> dict[str, tuple[tuple[int, ...], torch.dtype, str | None]]:
        """Each model tensor at ``rate`` without reading it: (Hugging Face shape, stored dtype,
        code format or None); a quantized matrix's shape is [N, K] and its dtype that of its
        codes. Aliases of tied tensors are left out (``aliases`` names them)."""
        widths = self.rate_entry(rate)["widths"]
        out = {}
        for name, stored in self._parts.items():
            entry = self.tensors[stored["codes" if "codes" in stored else ""]]
            shape = list(entry["shape"])
            if entry.get("layout") is not None:  # the pruned axis keeps its kept units' positions
                shape[int(entry["layout"]["axis"])] = kept_units(entry, widths) * _per_unit(entry)
            if "codes" in stored:
                shape = [shape[0], shape[1] * BLOCK]
            out[name] = (tuple(shape), TORCH_DTYPES[entry["dtype"]], self._format(stored))
        return out

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each stored model tensor's unpruned Hugging Face shape (a quantized matrix's [N, K])."""
        out = {}
        for name, stored in self._parts.items():
            if "codes" in stored:
                shape = self.tensors[stored["codes"]]["shape"]
                out[name] = (shape[0], shape[1] * BLOCK)
            else:
                out[name] = tuple(self.tensors[stored[""]]["shape"])
        return out

    @property
    def names(self) -> list[str]:
        """The model tensors stored (aliases of tied tensors left out, as ``aliases`` names them)."""
        return list(self._parts)

    def holds(self, name: str) -> bool:
        """Whether model tensor ``name`` is stored (or aliased) in the checkpoint."""
        return name in self._parts or name in self.manifest["aliases"]

    @property
    def aliases(self) -> dict[str, str]:
        """{alias: stored name} of tied tensors (a tied LM head names the embedding)."""
        return dict(self.manifest["aliases"])

    def read_rate(self, rate: float, verify: bool = True) -> dict[str, torch.Tensor | Quantized]:
        """The model at ``rate`` as one dict (see ``iter_rate``)."""
        return dict(self.iter_rate(rate, verify))

    def tokenizer(self):
        """The tokenizer saved with the checkpoint."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

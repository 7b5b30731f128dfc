"""A bounded reading of a GGUF file's header, done before gguf-py or transformers sees the file.

gguf-py's ``GGUFReader`` trusts what a header claims: a length past the end of the file surfaces
as an IndexError or a numpy reshape error deep inside it, a duplicated key as a KeyError, an
array's claimed length is walked element by element, and transformers then reads any tensor
type gguf-py has no dequantizer for. This reader checks every count, length, type and tensor
range against the file's size before using it, allocates nothing a header can size (it
memory-maps the file and keeps only scalar metadata and the tensor table), and never reads
tensor data. It reads what llama.cpp reads: little-endian GGUF versions 2 and 3, arrays of
scalars or strings, at most four dimensions per tensor, and each tensor's data right after the
previous one's (aligned), so that a corrupted offset cannot point two tensors at one range.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, dequantize

VERSIONS = (2, 3)  # gguf-py's GGUFReader reads these; version 1 had 32-bit lengths
MAX_DIMS = 4  # llama.cpp's GGML_MAX_DIMS
FIXED = 4 + 4 + 8 + 8  # magic, version, tensor count, metadata count
# The least a metadata pair (an empty key, its type, a one-byte value) and a tensor's record (an
# empty name, no dimensions, its type and offset) take: a claimed count is checked against them.
MIN_PAIR = 8 + 4 + 1
MIN_TENSOR = 8 + 4 + 4 + 8
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
            GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
            GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


class GGUFHeaderError(ValueError):
    """A GGUF header that is malformed or claims more than its file holds."""


@dataclass(frozen=True)
class Array:
    """A metadata array, checked but not kept: its item type and length."""

    item_type: GGUFValueType
    count: int

    def __str__(self) -> str:
        return f"an array of {self.count} {self.item_type.name}"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's record: its shape in torch's order (the file's dimensions reversed), its type
    and the size of its data."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a checked header holds: its metadata (scalars as Python values, arrays as ``Array``)
    and its tensors by name."""

    metadata: dict[str, str | int | float | bool | Array]
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Reads little-endian values from ``buf``, each checked against the bytes left."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> int:
        left = len(self.buf) - self.pos
        if n > left:
            raise GGUFHeaderError(f"{what} at byte {self.pos} needs {n} bytes, but the file ends {left} bytes later")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFHeaderError(f"{what} at byte {start} is not UTF-8 text") from None

    def count(self, n: int, least: int, what: str) -> None:
        """Refuse a claimed number of items the rest of the file is too short to hold."""
        left = len(self.buf) - self.pos
        if n * least > left:
            raise GGUFHeaderError(f"the header claims {n} {what}, but the {left} bytes after byte {self.pos} "
                                  f"hold at most {left // least}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """The checked header of the GGUF file ``path``; GGUFHeaderError says what is wrong with it."""
    size = path.stat().st_size
    if size < FIXED:
        raise GGUFHeaderError(f"the file is {size} bytes, shorter than a GGUF header ({FIXED} bytes)")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(_Cursor(buf))


def _parse(cur: _Cursor) -> GGUFHeader:
    magic = cur.buf[:4]
    if magic != b"GGUF":
        raise GGUFHeaderError(f"it does not start with the GGUF magic (it starts with {magic!r})")
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise GGUFHeaderError(f"it is a big-endian GGUF (version {swapped}); elastiq reads little-endian GGUF "
                                  "files, as llama.cpp writes them")
        raise GGUFHeaderError(f"GGUF version {version} is not one elastiq reads ({' or '.join(map(str, VERSIONS))})")
    n_tensors, n_pairs = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
    cur.count(n_pairs, MIN_PAIR, "metadata key/value pairs")
    cur.count(n_tensors, MIN_TENSOR, "tensors")
    metadata: dict[str, str | int | float | bool | Array] = {}
    for _ in range(n_pairs):
        key = cur.string(f"metadata key {len(metadata)}")
        if key in metadata:
            raise GGUFHeaderError(f"metadata key {key!r} appears twice")
        metadata[key] = _value(cur, _value_type(cur.scalar("I", f"the type of {printable(key)}"), printable(key)), key)
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):  # an integer: _value checks its type
        raise GGUFHeaderError(f"general.alignment must be a power of two, got {alignment}")
    records = [_tensor_record(cur, i) for i in range(n_tensors)]
    data_start = _aligned(cur.pos, alignment)
    tensors: dict[str, TensorInfo] = {}
    expected = 0  # llama.cpp's layout: each tensor's data follows the previous one's, aligned
    for name, dims, ggml_type, offset in records:
        if name in tensors:
            raise GGUFHeaderError(f"tensor {name!r} appears twice")
        if offset != expected:
            raise GGUFHeaderError(f"tensor {printable(name)}'s data is at offset {offset} of the data section, "
                                  f"where llama.cpp lays it out after the tensors before it, at {expected}")
        tensors[name] = _tensor(name, dims, ggml_type, data_start + offset, len(cur.buf))
        expected = _aligned(offset + tensors[name].nbytes, alignment)
    return GGUFHeader(metadata, tensors)


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def printable(text: str) -> str:
    """A name read from the file, as a message can show it (quoted where it holds control characters)."""
    return text if text and text.isprintable() else repr(text)


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise GGUFHeaderError(f"{what} has value type {raw}, which GGUF does not define") from None


def _value(cur: _Cursor, vtype: GGUFValueType, key: str) -> str | int | float | bool | Array:
    label = printable(key)
    if key == "general.alignment" and vtype != GGUFValueType.UINT32:
        raise GGUFHeaderError(f"general.alignment must be a UINT32, got a {vtype.name}")
    if vtype == GGUFValueType.STRING:
        return cur.string(f"the value of {label}")
    if vtype != GGUFValueType.ARRAY:
        return cur.scalar(_SCALARS[vtype], f"the value of {label}")
    item_type = _value_type(cur.scalar("I", f"the item type of {label}"), f"{label}'s items")
    n = cur.scalar("Q", f"the length of {label}")
    if item_type == GGUFValueType.ARRAY:
        raise GGUFHeaderError(f"{label} is an array of arrays, which llama.cpp does not read")
    if item_type == GGUFValueType.STRING:
        cur.count(n, 8, f"strings in {label}")
        for i in range(n):
            cur.string(f"{label}[{i}]")
    else:
        item = struct.calcsize(_SCALARS[item_type])
        cur.take(n * item, f"{label} ({n} values of {item} bytes)")
    return Array(item_type, n)


def _tensor_record(cur: _Cursor, index: int) -> tuple[str, list[int], GGMLQuantizationType, int]:
    name = cur.string(f"the name of tensor {index}")
    label = printable(name)
    n_dims = cur.scalar("I", f"tensor {label}'s dimension count")
    if n_dims > MAX_DIMS:
        raise GGUFHeaderError(f"tensor {label} claims {n_dims} dimensions; GGUF tensors have at most {MAX_DIMS}")
    dims = [cur.scalar("Q", f"tensor {label}'s dimension {d}") for d in range(n_dims)]
    raw = cur.scalar("I", f"tensor {label}'s type")
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        raise GGUFHeaderError(f"tensor {label} has type {raw}, which gguf-py does not know") from None
    return name, dims, ggml_type, cur.scalar("Q", f"tensor {label}'s offset")


def _tensor(name: str, dims: list[int], ggml_type: GGMLQuantizationType, start: int, size: int) -> TensorInfo:
    """A tensor's record, checked: a type gguf-py can dequantize, whole blocks per row, and data
    that lies inside the file."""
    label = printable(name)
    if not dequantizable(ggml_type):
        raise GGUFHeaderError(f"tensor {label} is of type {ggml_type.name}, which gguf-py cannot dequantize")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims and dims[0] % block:
        raise GGUFHeaderError(f"tensor {label}'s rows of {dims[0]} values are not whole {ggml_type.name} "
                              f"blocks of {block}")
    nbytes = math.prod(dims) // block * type_size
    if start + nbytes > size:
        raise GGUFHeaderError(f"tensor {label} ({' x '.join(map(str, dims))} {ggml_type.name}) claims bytes "
                              f"{start} to {start + nbytes}, past the end of the file ({size} bytes)")
    return TensorInfo(name, tuple(reversed(dims)), ggml_type, nbytes)


@lru_cache(maxsize=None)
def dequantizable(ggml_type: GGMLQuantizationType) -> bool:
    """Whether gguf-py can dequantize ``ggml_type`` (transformers reads every GGUF weight through
    it): tried on one block of zeros."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True

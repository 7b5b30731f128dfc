"""Untrusted compress inputs (issue 18): a corrupted GGUF or Hugging Face folder gives one clean
ElastiqError naming the problem, or loads as the model it describes; never a traceback, and a
header's absurd sizes are refused before anything of that size is allocated.

The fuzz runs in-process on a tiny Llama saved both ways: seeded mutations of the GGUF's header
fields (counts, lengths, types, dimensions, offsets set to boundary or absurd values), random
header byte flips and truncations; and of the folder's config.json fields (deleted, retyped, out
of range), its safetensors header and its files' lengths.
"""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from elastiq import ElastiqError
from elastiq.cli import main
from elastiq.compressor.intake import ModelLoadError, check_source, load_model
from conftest import build_tiny, dense_gguf

SEED = 18
MAX_GROWTH_MB = 512  # peak RSS growth over a fuzz; a size taken at its word from a header costs GBs
MAX_ERROR_S = 5.0  # a refusal comes before any real work (an absurd size once took a minute)
ABSURD = (2**31 + 1, 2**32 - 1, 2**40, 2**62, 2**64 - 1)


@dataclass(frozen=True)
class Slot:
    """A fixed-size field of the GGUF header: where it is, its struct format and its value."""

    name: str
    offset: int
    fmt: str
    value: int | float


def _header_slots(path: Path) -> tuple[list[Slot], int]:
    """Every fixed-size field of a GGUF's header (gguf-py's reader keeps each as a view of the
    file, so its offset is the view's address less the file's) and where the tensor data starts."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    slots = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for i, part in enumerate(field.parts):
            if part.itemsize == 1 and part.size > 1:  # a string's bytes
                continue
            fmt = {1: "B", 4: "I", 8: "Q"}[part.itemsize] if part.dtype.kind in "uib" else \
                {4: "f", 8: "d"}[part.itemsize]
            slots += [Slot(f"{field.name}[{i}][{j}]", part.ctypes.data - base + j * part.itemsize, fmt,
                           part[j].item()) for j in range(part.size)]
    return slots, reader.data_offset


@pytest.fixture(scope="module")
def sources(tokenizer, data_dir, tmp_path_factory) -> dict:
    """A tiny Llama as a Hugging Face folder and as a float32 GGUF, each loaded once (its
    parameter shapes are what a mutated source that loads must give), and the GGUF's header
    fields."""
    root = tmp_path_factory.mktemp("faults")
    _, gguf_path = dense_gguf(build_tiny("llama", tokenizer), tokenizer, root, data_dir)
    slots, data_start = _header_slots(gguf_path)
    shapes = {key: {n: tuple(p.shape) for n, p in load_model(path).model.named_parameters()}
              for key, path in (("gguf", gguf_path), ("hf", root / "hf"))}
    return {"gguf": gguf_path, "hf": root / "hf", "shapes": shapes, "slots": slots, "data_start": data_start}


def _outcome(source: Path, shapes: dict, case: str) -> str:
    """Load ``source``: "error" for a clean one-line ElastiqError naming it, "loaded" for the
    model ``shapes`` describe; anything else fails the test, naming ``case``."""
    start = time.perf_counter()
    try:
        loaded = load_model(source)
    except ElastiqError as err:
        message = str(err)
        assert "\n" not in message and str(source) in message, f"{case}: {message!r}"
        assert time.perf_counter() - start < MAX_ERROR_S, f"{case}: refused only after {time.perf_counter() - start} s"
        return "error"
    except Exception as err:  # noqa: BLE001 - the point of the test: any other exception is a failure
        raise AssertionError(f"{case}: {type(err).__name__}: {err}") from err
    got = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    assert got == shapes, f"{case}: loaded a model of other shapes"
    return "loaded"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _packed(fmt: str, value: int | float) -> bytes:
    if fmt in "fd":
        return struct.pack("<" + fmt, float(value))
    return struct.pack("<" + fmt, int(value) % (1 << (8 * struct.calcsize(fmt))))


def _gguf_cases(pristine: bytes, slots: list[Slot], data_start: int, rng: random.Random):
    """(case, mutated bytes): header fields set to boundary or absurd values, header bytes
    flipped, the file truncated."""
    fields: dict[str, list[Slot]] = {}
    for slot in slots:  # each field as likely as another, whatever the length of its array
        fields.setdefault(slot.name.partition("[")[0], []).append(slot)
    for _ in range(100):
        slot = rng.choice(fields[rng.choice(sorted(fields))])
        value = rng.choice([0, 1, 3, slot.value + 1, slot.value - 1, slot.value * 2, *ABSURD,
                            rng.getrandbits(8 * struct.calcsize(slot.fmt))])
        if slot.fmt in "fd":
            value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30])
        data = bytearray(pristine)
        data[slot.offset:slot.offset + struct.calcsize(slot.fmt)] = _packed(slot.fmt, value)
        yield f"{slot.name} = {value}", bytes(data)
    for _ in range(40):
        at = rng.randrange(data_start)
        data = bytearray(pristine)
        data[at] ^= rng.randrange(1, 256)
        yield f"byte {at} flipped", bytes(data)
    for _ in range(30):
        size = rng.randrange(len(pristine))
        yield f"truncated to {size} bytes", pristine[:size]


def test_gguf_fuzz(sources, tmp_path):
    pristine = sources["gguf"].read_bytes()
    target = tmp_path / "model.gguf"
    rng = random.Random(SEED)
    counts = {"error": 0, "loaded": 0}
    start, peak = time.perf_counter(), _peak_mb()
    for case, data in _gguf_cases(pristine, sources["slots"], sources["data_start"], rng):
        target.write_bytes(data)
        counts[_outcome(target, sources["shapes"]["gguf"], case)] += 1
    assert _peak_mb() - peak < MAX_GROWTH_MB
    assert counts["error"] > 100 and counts["loaded"] > 0, counts
    print(f"GGUF fuzz: {counts} in {time.perf_counter() - start:.1f} s")


def _config_cases(config: dict, rng: random.Random):
    """(case, config): a field (or a RoPE entry) deleted, retyped or out of range."""
    fields = [*config, "head_dim", "num_key_value_heads", "rope_parameters.rope_theta",
              "rope_parameters.rope_type", "rope_parameters.factor", "text_config"]
    for _ in range(120):
        field = rng.choice(fields)
        mutated = json.loads(json.dumps(config))
        outer, _, key = field.rpartition(".")
        holder = mutated
        if outer:
            if not isinstance(mutated.get(outer), dict):
                mutated[outer] = {}
            holder = mutated[outer]
        old = holder.get(key)
        value = rng.choice(["DELETE", "64", 64.5, [64], {"x": 1}, None, True, 0, -1, *ABSURD, "bogus",
                            old * 2 if isinstance(old, int) and not isinstance(old, bool) else "x"])
        if value == "DELETE":
            holder.pop(key, None)
        else:
            holder[key] = value
        yield f"config {field} = {value!r}", mutated


def test_hf_fuzz(sources, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(sources["hf"], folder)
    files = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors", "tokenizer.json",
                                                              "tokenizer_config.json")}
    config = json.loads(files["config.json"])
    header_end = 8 + struct.unpack("<Q", files["model.safetensors"][:8])[0]
    rng = random.Random(SEED)

    def cases():
        for case, mutated in _config_cases(config, rng):
            yield case, "config.json", json.dumps(mutated).encode()
        for _ in range(40):
            data = bytearray(files["model.safetensors"])
            at = rng.randrange(header_end)
            data[at] ^= rng.randrange(1, 256)
            yield f"safetensors byte {at} flipped", "model.safetensors", bytes(data)
        for _ in range(40):
            name = rng.choice(list(files))
            size = rng.randrange(len(files[name]))
            yield f"{name} truncated to {size} bytes", name, files[name][:size]

    counts = {"error": 0, "loaded": 0}
    start, peak = time.perf_counter(), _peak_mb()
    for case, name, data in cases():
        (folder / name).write_bytes(data)
        counts[_outcome(folder, sources["shapes"]["hf"], case)] += 1
        (folder / name).write_bytes(files[name])
    assert _peak_mb() - peak < MAX_GROWTH_MB
    assert counts["error"] > 100 and counts["loaded"] > 0, counts
    print(f"Hugging Face fuzz: {counts} in {time.perf_counter() - start:.1f} s")


# --- the main cases, message by message -----------------------------------------------------------


def _slot(sources, name: str) -> Slot:
    return next(s for s in sources["slots"] if s.name == name)


def _gguf_with(sources, tmp_path, name: str, value: int) -> Path:
    """The tiny GGUF with header field ``name`` (as ``Slot`` names them) set to ``value``."""
    slot = _slot(sources, name)
    data = bytearray(sources["gguf"].read_bytes())
    data[slot.offset:slot.offset + struct.calcsize(slot.fmt)] = _packed(slot.fmt, value)
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name, value, message", [
    ("GGUF.kv_count[0][0]", 2**40, r"not a readable GGUF file: the header claims 1099511627776 metadata key/value "
                                   r"pairs, but the \d+ bytes after byte 24 hold at most \d+"),
    ("GGUF.tensor_count[0][0]", 2**40, r"claims 1099511627776 tensors"),
    ("general.architecture[3][0]", 2**62, r"the value of general.architecture at byte 64 needs 4611686018427387904 "
                                          r"bytes, but the file ends \d+ bytes later"),
    ("tokenizer.ggml.tokens[4][0]", 2**40, r"claims 1099511627776 strings in tokenizer.ggml.tokens"),
    ("token_embd.weight[3][1]", 2**40, r"tensor token_embd.weight \(64 x 1099511627776 F32\) claims bytes \d+ to \d+, "
                                       r"past the end of the file"),
    ("token_embd.weight[5][0]", 2**40, r"tensor token_embd.weight's data is at offset 1099511627776 of the data "
                                       r"section, where llama.cpp lays it out after the tensors before it, at 0"),
    ("token_embd.weight[4][0]", 99, r"tensor token_embd.weight has type 99, which gguf-py does not know"),
    ("token_embd.weight[2][0]", 9, r"tensor token_embd.weight claims 9 dimensions; GGUF tensors have at most 4"),
    ("GGUF.version[0][0]", 1, r"GGUF version 1 is not one elastiq reads \(2 or 3\)"),
    ("llama.attention.head_count[3][0]", 0, r"llama.attention.head_count must be an integer from 1 to 2147483648, "
                                            r"got 0"),
    ("tokenizer.ggml.bos_token_id[3][0]", 10**6, r"tokenizer.ggml.bos_token_id must be a token id below 512"),
])
def test_gguf_header_messages(sources, tmp_path, name, value, message):
    path = _gguf_with(sources, tmp_path, name, value)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
    with pytest.raises(ModelLoadError, match=message):  # `elastiq run` refuses it before compressing
        check_source(path)


def test_gguf_absurd_embedding_length_refused_before_allocation(sources, tmp_path):
    """A 2**20 embedding length on a 64-wide model: transformers would build the model it
    describes (11 GB) before comparing shapes; it is refused in well under a second."""
    path = _gguf_with(sources, tmp_path, "llama.embedding_length[3][0]", 2**20)
    start, peak = time.perf_counter(), _peak_mb()
    with pytest.raises(ModelLoadError, match=r"model.gguf: tensor token_embd.weight is \[512, 64\], but the config "
                                             r"\(hidden_size 1048576, .*\) calls for \[512, 1048576\]"):
        load_model(path)
    assert time.perf_counter() - start < MAX_ERROR_S and _peak_mb() - peak < MAX_GROWTH_MB


def test_gguf_duplicate_key(sources, tmp_path):
    data = sources["gguf"].read_bytes().replace(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id")
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="metadata key 'tokenizer.ggml.bos_token_id' appears twice"):
        load_model(path)


def _folder(sources, tmp_path) -> Path:
    shutil.copytree(sources["hf"], tmp_path / "hf")
    return tmp_path / "hf"


def _with_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": "64"}, r"config.json: hidden_size must be an integer from 1 to 2147483648, got '64'"),
    ({"num_attention_heads": 0}, r"config.json: num_attention_heads must be an integer from 1 to 2147483648, got 0"),
    ({"num_key_value_heads": 3}, r"config.json: num_attention_heads \(4\) must be a multiple of num_key_value_heads "
                                 r"\(3\)"),
    ({"vocab_size": 2**40}, r"vocab_size must be an integer from 1 to 2147483648, got 1099511627776"),
    ({"rope_parameters": {"rope_type": "bogus"}}, r"rope_parameters.rope_type must be one of default, linear"),
    ({"dtype": "float8"}, r"dtype must be the name of a floating-point torch dtype"),
    ({"hidden_size": 2**20}, r"hf: tensor model.embed_tokens.weight is \[512, 64\], but the config \(hidden_size "
                             r"1048576, .*\) calls for \[512, 1048576\]"),
    ({"num_hidden_layers": 10**6}, r"hf: the config's 1000000 layers cannot be made of the 20 tensors"),
    ({"num_hidden_layers": 1}, r"hf holds weights its config has no place for: model.layers.1.input_layernorm.weight"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"config.json describes a quantized model"),
    ({"model_type": ["llama"]}, r"holds model_type \['llama'\], which elastiq does not support"),
])
def test_hf_config_messages(sources, tmp_path, changes, message):
    folder = _with_config(_folder(sources, tmp_path), **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder)


def test_hf_file_messages(sources, tmp_path):
    folder = _folder(sources, tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[:-1])
    with pytest.raises(ModelLoadError, match=r"model.safetensors is not a readable safetensors file \(Error while "
                                             r"deserializing header: incomplete metadata, file not fully covered\)"):
        check_source(folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"index.json names shards that are missing: "
                                             r"model-00001-of-00002.safetensors"):
        load_model(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00001.safetensors").write_bytes(weights)
    (folder / "model-00001-of-00001.safetensors").rename(folder / "model.safetensors")
    (folder / "tokenizer.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"tokenizer.json is not a readable tokenizer file \(invalid type: "
                                             r"sequence"):
        load_model(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer: expected tokenizer.json"):
        load_model(folder)


def test_hf_missing_weight(sources, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(sources, tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"describes a model of 168,256 weights, but the files hold 162,112"):
        load_model(folder)


def test_cli_compress_reports_a_bad_gguf_in_one_line(sources, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(sources["gguf"].read_bytes()[:5000])
    assert main(["compress", str(path), "-o", str(tmp_path / "out.elastiq")]) == 2
    err = capsys.readouterr().err
    # which token the cut falls in depends on the tokenizer trained for the tests; the message must
    # name it, the byte where it starts and how much of it the 5,000-byte file lacks
    found = re.fullmatch(rf"elastiq: error: {re.escape(str(path))} is not a readable GGUF file: "
                         r"tokenizer\.ggml\.tokens\[(\d+)\] at byte (\d+) needs (\d+) bytes, but the file ends (\d+) "
                         r"bytes later\n", err)
    assert found, err
    index, start, needs, left = map(int, found.groups())
    assert 0 < index < 512 and start + left == 5000 and needs > left
    assert "Traceback" not in err
    assert not (tmp_path / "out.elastiq").exists()

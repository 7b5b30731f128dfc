"""A damaged checkpoint, whatever the damage, gives one clean error or a correct run: never a
traceback, never a run of corrupted data (seeded fuzz over a tiny 4-bit checkpoint; the longer run
is ``benchmarks/fuzz_checkpoints.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import reseal
from elastiq.checkpoint import Checkpoint, CheckpointError
from elastiq.compressor.compress import CompressOptions, compress
from elastiq.compressor.quantize import QuantizeOptions, quantize_checkpoint

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz_checkpoints as fz  # noqa: E402

CASES = 280  # 40 of each kind of damage


@pytest.fixture(scope="module")
def good(models, data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    options = CompressOptions(rates=(0.35,), calib_samples=2, calib_seqlen=32, quality_windows=1)
    float_path = compress(models["llama"][0], root / "f.elastiq", options, data=data_dir, progress=False)
    return quantize_checkpoint(float_path, root / "q.elastiq", QuantizeOptions(method="rtn", quality_windows=1),
                               data=data_dir, progress=False)


@pytest.fixture(scope="module")
def fuzzed(good, tmp_path_factory) -> list[dict]:
    return fz.fuzz(good, CASES, seed=0, work=tmp_path_factory.mktemp("cases"))["rows"]


def test_no_damage_gives_a_traceback(fuzzed):
    tracebacks = [f"{r['kind']} ({r['damage']}) {r['command']}: {r['message']}" for r in fuzzed
                  if r["outcome"] == "traceback"]
    assert not tracebacks, "\n".join(tracebacks)
    assert {r["kind"] for r in fuzzed} == set(fz.KINDS) and {r["command"] for r in fuzzed} == set(fz.COMMANDS)


def test_no_damaged_checkpoint_runs_silently(fuzzed):
    """Damage that is not a deliberate, re-hashed edit is refused, or touches nothing the command
    uses (its output equals the undamaged checkpoint's)."""
    silent = [f"{r['kind']} ({r['damage']}) {r['command']}" for r in fuzzed
              if r["outcome"] == "ran, differs" and r["kind"] != fz.REHASHED]
    assert not silent, "\n".join(silent)
    manifest = [r for r in fuzzed if r["kind"] == "manifest field"]
    assert all(r["outcome"] == "error" for r in manifest)  # every byte of the manifest is covered by its sha256


def test_a_flipped_byte_that_a_rate_reads_fails_its_sha256_check(fuzzed):
    flips = [r for r in fuzzed if r["kind"] == "data byte" and r["in_read"]]
    assert len(flips) >= 20
    assert all(r["outcome"] == "error" and "fail their sha256 check" in r["message"] for r in flips)
    unread = [r for r in fuzzed if r["kind"] == "data byte" and r["in_read"] is False]
    assert unread and all(r["outcome"] == "ran, same" for r in unread)  # inspect, or the tail export cuts away


def _rewritten(good: Path, tmp_path: Path, change) -> Path:
    """A copy of ``good`` whose manifest ``change`` edits, re-hashed as a deliberate edit would be."""
    path = tmp_path / "edited.elastiq"
    fz._copy(good, path, private=("manifest.json",))
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return reseal(path)


@pytest.mark.parametrize("change,message", [
    (lambda m: m["heads"].pop("head_dim"), r"manifest field heads.head_dim is missing; expected a positive integer"),
    (lambda m: m["groups"].__setitem__(0, []), r"manifest field groups\[0\] is \[\]; expected an object"),
    (lambda m: m["rates"][1].__setitem__("weight_bytes", 1),
     r"manifest field rates\[1\].weight_bytes is 1; expected \d+, the bytes its widths keep"),
    (lambda m: m["rates"][0]["widths"].popitem(),
     r"manifest field rates\[0\].widths is .*; expected an object with a kept width for every group"),
    (lambda m: m["tensors"]["model.norm.weight"].__setitem__("shape", [7]),
     r"storage_shape is \[64\]; expected \[7\], its shape"),
    (lambda m: m["quantization"].__setitem__("format", "q3_k"), r"quantization.format is \"q3_k\"; expected one of"),
    (lambda m: m.__setitem__("tensors", {}), r"manifest field tensors is \{\}; expected a non-empty object"),
    (lambda m: m["aliases"].__setitem__("lm_head.weight", "nothing"), r"aliases\['lm_head.weight'\] is \"nothing\""),
])
def test_a_bad_field_is_named_with_what_was_expected(good, tmp_path, change, message):
    path = _rewritten(good, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(path)


def test_an_edited_manifest_fails_its_own_sha256(good, tmp_path):
    path = tmp_path / "edited.elastiq"
    fz._copy(good, path, private=("manifest.json",))
    text = (path / "manifest.json").read_text().replace('"rms_norm_eps": ', '"rms_norm_eps": 1')
    (path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"manifest.json fails its sha256 check: its contents are not what was "
                                              r"written \(damaged in transfer or edited\)"):
        Checkpoint(path)

"""Damaged checkpoints through `elastiq inspect`, `run` and `export`: every outcome must be a clean
error or a correct run, never a Python traceback or a run of corrupted data.

Each case copies a good checkpoint (hard links for the files it leaves alone), damages one thing,
and runs the three commands in this process through ``elastiq.cli.main``. Kinds of damage:

- ``truncated weights``: ``weights.safetensors`` cut at a random length;
- ``safetensors header``: one byte of the weights file's header (or its length) changed;
- ``data byte``: one byte of tensor data flipped; ``in read`` says whether the command's rate reads it;
- ``manifest field``: one field of ``manifest.json`` deleted, given another type or another value,
  as a transfer error would (the manifest's own sha256 left as written);
- ``manifest field, re-hashed``: the same, with the manifest's sha256 recomputed, as a crafted
  manifest would be; a run of it is correct when it runs what the manifest says;
- ``manifest replaced``: ``""``, ``{``, ``[]``, ``null``, ``1``, ``{"format_version": 1}`` and the like;
- ``tokenizer file``: a tokenizer file truncated, deleted or with a byte flipped.

Outcomes: ``error`` (exit 2, one ``elastiq: error:`` line), ``ran, same`` (exit 0 and the output of
the undamaged checkpoint), ``ran, differs`` (exit 0 and another output) and ``traceback`` (an
exception escaped). For damage that is not re-hashed, ``ran, differs`` is a silent run of
corrupted data.

    python benchmarks/fuzz_checkpoints.py [CKPT] --cases 2000 --output benchmarks/results/fuzz_checkpoints.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KINDS = ("truncated weights", "safetensors header", "data byte", "manifest field", "manifest field, re-hashed",
         "manifest replaced", "tokenizer file")
REHASHED = "manifest field, re-hashed"
COMMANDS = ("inspect", "run", "export")
OUTCOMES = ("error", "ran, same", "ran, differs", "traceback")
REPLACEMENTS = ("", "{", "[]", "null", "1", '{"format_version": 1}', '{"format_version": 3}', '"manifest"',
                "[" * 100_000, '{"format": "elastiq-nested-checkpoint", "format_version": 2}')
OTHER_VALUES = (None, True, False, "x", "", 0, -1, 1.5, 2 ** 63, -(2 ** 31), [], {}, [1, "a"], {"a": 1},
                float("nan"), float("inf"))


@dataclass
class Case:
    kind: str
    what: str  # the damage, in words
    offset: int | None = None  # a flipped data byte's offset in the weights file


# --- damage -------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, private: tuple[str, ...] = ()) -> None:
    """``src`` at ``dst``: files in ``private`` copied (they will be damaged), the rest hard-linked."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (shutil.copyfile if f.name in private else os.link)(f, dst / f.name)


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _pick_path(manifest: dict, rng: random.Random) -> tuple:
    """A field of ``manifest``: descend from a random top-level field, stopping at each container
    with probability 0.3, so that every level is damaged, not only the many tensor entries."""
    node, path = manifest, ()
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys or (path and rng.random() < 0.3):
            return path
        k = rng.choice(keys)
        node, path = node[k], path + (k,)


def _other_value(value, rng: random.Random, strings: list[str]):
    """A value of the same type that differs from ``value`` (what a flipped digit or a wrong edit gives)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, -value or -1, value * 2 + 1, 2 ** 40, value // 2])
    if isinstance(value, float):
        return rng.choice([value * 1.5 or 1.0, -value or -1.0, 0.0, value + 1e-3, math.inf])
    if isinstance(value, str):
        return rng.choice([s for s in strings if s != value] + ["", value + "x", value[::-1] + "!"])
    if isinstance(value, list):
        return rng.choice([value[:-1], value + value[:1], [], list(reversed(value))]) if value else [0]
    if isinstance(value, dict):
        keys = list(value)
        return {k: value[k] for k in keys[:-1]} if keys else {"x": 1}
    return rng.choice(OTHER_VALUES[1:])


def damage_manifest(manifest: dict, rng: random.Random, rehash: bool) -> tuple[dict, str]:
    """``manifest`` with one field deleted, retyped or changed (its sha256 recomputed if ``rehash``)."""
    from elastiq.manifest import DIGEST, digest

    m = json.loads(json.dumps(manifest))
    strings = sorted({v for p in _paths(m) if isinstance(v := _get(m, p), str) and len(v) < 200})
    while True:
        path = _pick_path(m, rng)
        if rehash and path[:1] == (DIGEST,):
            continue  # the digest itself is what re-hashing rewrites
        parent, key, value = (_get(m, path[:-1]), path[-1], _get(m, path)) if path else (None, None, m)
        op = rng.choice(("delete", "type", "value")) if parent is not None else "value"
        if op == "delete":
            del parent[key]
            what = f"deleted {_name(path)}"
        else:
            new = rng.choice([v for v in OTHER_VALUES if type(v) is not type(value)]) if op == "type" \
                else _other_value(value, rng, strings)
            if parent is None:
                m = new
            else:
                parent[key] = new
            what = f"{_name(path)}: {_short(value)} -> {_short(new)}"
        break
    if rehash and isinstance(m, dict) and DIGEST in m:
        m[DIGEST] = digest(m)
    return m, what


def _get(node, path: tuple):
    for k in path:
        node = node[k]
    return node


def _name(path: tuple) -> str:
    return "".join(f"[{k!r}]" if isinstance(k, str) and ("." in k or not k.isidentifier()) else
                   f".{k}" if isinstance(k, str) else f"[{k}]" for k in path).lstrip(".") or "(whole manifest)"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def make_case(good: Path, dst: Path, kind: str, rng: random.Random) -> Case:
    """A damaged copy of checkpoint ``good`` at ``dst``."""
    weights, manifest_file = "weights.safetensors", "manifest.json"
    if kind in ("truncated weights", "safetensors header", "data byte"):
        _copy(good, dst, private=(weights,))
        path = dst / weights
        size = path.stat().st_size
        with open(path, "r+b") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if kind == "truncated weights":
                cut = rng.randrange(size)
                f.truncate(cut)
                return Case(kind, f"cut at byte {cut} of {size}")
            offset = rng.randrange(8 + n) if kind == "safetensors header" else rng.randrange(8 + n, size)
            f.seek(offset)
            byte = f.read(1)[0]
            new = byte ^ (1 << rng.randrange(8)) if kind == "data byte" else rng.choice(
                [b for b in range(256) if b != byte])
            f.seek(offset)
            f.write(bytes([new]))
        return Case(kind, f"byte {offset}: {byte:#04x} -> {new:#04x}", offset if kind == "data byte" else None)
    if kind == "manifest replaced":
        _copy(good, dst, private=(manifest_file,))
        text = rng.choice(REPLACEMENTS + ("<random bytes>", "<truncated>"))
        original = (good / manifest_file).read_bytes()
        raw = os.urandom(rng.randrange(1, 200)) if text == "<random bytes>" else \
            original[:rng.randrange(len(original))] if text == "<truncated>" else text.encode()
        (dst / manifest_file).write_bytes(raw)
        return Case(kind, f"replaced by {text[:30]!r}")
    if kind == "tokenizer file":
        files = sorted(json.loads((good / manifest_file).read_text()).get("files", {}))
        name = rng.choice(files)
        _copy(good, dst, private=(name,))
        path = dst / name
        how = rng.choice(("flip", "truncate", "delete"))
        data = path.read_bytes()
        if how == "delete":
            path.unlink()
        elif how == "truncate":
            path.write_bytes(data[:rng.randrange(len(data))])
        else:
            i = rng.randrange(len(data))
            path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
        return Case(kind, f"{name}: {how}")
    _copy(good, dst, private=(manifest_file,))
    manifest, what = damage_manifest(json.loads((good / manifest_file).read_text()), rng, rehash=kind == REHASHED)
    (dst / manifest_file).write_text(json.dumps(manifest, indent=1))
    return Case(kind, what)


# --- the commands ---------------------------------------------------------------------------------

def command_args(command: str, ckpt: Path, out: Path, rates: tuple[float, float]) -> list[str]:
    """The command line of ``command`` on ``ckpt``: ``run`` at the first offered rate (rate 0 reads
    every byte), ``export`` at the last (a byte prefix of each pruned tensor)."""
    if command == "inspect":
        return ["inspect", str(ckpt), "--layers"]
    if command == "run":
        return ["run", str(ckpt), "--rate", str(rates[0]), "--max-kl", "inf", "--ctx", "64", "--max-new-tokens", "4",
                "-p", "What is the capital of France?"]
    return ["export", str(ckpt), "--rate", str(rates[1]), "--format", "gguf", "-o", str(out)]


def run_command(args: list[str], out: Path | None) -> tuple[str, str]:
    """(outcome before comparing, output or message): ``ok`` with the output (stdout, or the
    exported file's sha256), ``error`` with the error line, or ``traceback`` with the exception."""
    from elastiq.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(args)
    except SystemExit as exit_:  # argparse
        return "traceback", f"SystemExit({exit_.code}): {stderr.getvalue()[-300:]}"
    except BaseException as err:  # noqa: BLE001 -- what the fuzzer exists to find
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return "traceback", f"{type(err).__name__}: {str(err)[:200]} ({Path(frame.filename).name}:{frame.lineno})"
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("elastiq: error:")]
    if code == 2 and len(errors) == 1:
        return "error", errors[0].removeprefix("elastiq: error: ")
    if code != 0:
        return "traceback", f"exit {code} without one error line: {stderr.getvalue()[-300:]}"
    if args[0] == "export":
        return "ok", hashlib.sha256(out.read_bytes()).hexdigest()
    return "ok", stdout.getvalue()


def read_ranges(ckpt, rate: float) -> list[tuple[int, int]]:
    """The byte ranges of the weights file that loading ``rate`` of ``ckpt`` reads (and hashes)."""
    from elastiq.manifest import TORCH_DTYPES, kept_units, unit_bytes

    widths = ckpt.rate_entry(rate)["widths"]
    out = []
    for name, e in ckpt.tensors.items():
        start = ckpt._offsets[name][0]
        out.append((start, start + kept_units(e, widths) * unit_bytes(e["storage_shape"], TORCH_DTYPES[e["dtype"]])))
    return out


def fuzz(good: Path, cases: int, seed: int, work: Path, kinds: tuple[str, ...] = KINDS,
         log=lambda line: None) -> dict:
    """Run ``cases`` damaged copies of ``good`` through every command; the counts and every case."""
    from elastiq.checkpoint import Checkpoint

    ckpt = Checkpoint(good)
    rates = (ckpt.rates[0], ckpt.rates[-1])
    reads = {"run": read_ranges(ckpt, rates[0]), "export": read_ranges(ckpt, rates[1]), "inspect": []}
    reference = {}
    for command in COMMANDS:
        out = work / f"reference.{command}.gguf"
        outcome, output = run_command(command_args(command, good, out, rates), out)
        if outcome != "ok":
            raise SystemExit(f"the undamaged checkpoint fails {command}: {output}")
        reference[command] = output
        out.unlink(missing_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(cases):
        kind = kinds[i % len(kinds)]
        dst = work / f"case{i}" / good.name  # the same name: inspect prints it
        case = make_case(good, dst, kind, rng)
        for command in COMMANDS:
            out = work / f"case{i}.{command}.gguf"
            start = time.perf_counter()
            outcome, output = run_command(command_args(command, dst, out, rates), out)
            if outcome == "ok":
                outcome = "ran, same" if output == reference[command] else "ran, differs"
            in_read = None if case.offset is None else any(a <= case.offset < b for a, b in reads[command])
            rows.append({"case": i, "kind": kind, "damage": case.what, "command": command, "outcome": outcome,
                         "in_read": in_read, "message": output if outcome in ("error", "traceback") else None,
                         "seconds": round(time.perf_counter() - start, 3)})
            out.unlink(missing_ok=True)
            if outcome in ("traceback",) or (outcome == "ran, differs" and kind != REHASHED):
                log(f"case {i} {kind} ({case.what}) {command}: {outcome}: {output[:300]}")
        shutil.rmtree(dst.parent)
    return {"rows": rows, "counts": count(rows), "rates": list(rates)}


def summary(result: dict) -> dict:
    """What a run's JSON and table keep: the counts, the flipped bytes read and caught, the first
    error of each kind of damage and command, and every command that ran with another output or
    gave a traceback (the seed regenerates the rest)."""
    rows = result["rows"]
    flips = [r for r in rows if r["kind"] == "data byte" and r["in_read"]]
    samples = {}
    for r in rows:
        if r["outcome"] == "error":
            samples.setdefault((r["kind"], r["command"]), r)
    return {**{k: v for k, v in result.items() if k != "rows"}, "commands": len(rows),
            "flips_read": len(flips),
            "flips_caught": sum(r["outcome"] == "error" and "sha256" in r["message"] for r in flips),
            "error_samples": list(samples.values()),
            "other": [r for r in rows if r["outcome"] in ("ran, differs", "traceback")]}


def count(rows: list[dict]) -> dict:
    """{kind: {command: {outcome: n}}}."""
    out: dict = {}
    for r in rows:
        c = out.setdefault(r["kind"], {}).setdefault(r["command"], Counter())
        c[r["outcome"]] += 1
    return {k: {c: dict(v) for c, v in cmds.items()} for k, cmds in out.items()}


def markdown(result: dict, command: str) -> str:
    """The table of a run's ``summary``."""
    lines = [f"Command: `{command}`", "",
             f"{result['cases']} damaged copies of `{result['checkpoint']}` (seed {result['seed']}), each through "
             f"`inspect`, `run` (rate {result['rates'][0]}, which reads every stored byte) and `export` (GGUF at rate "
             f"{result['rates'][1]}, which reads a prefix of each pruned tensor): {result['commands']} commands in "
             f"{result['seconds'] / 60:.0f} min. `ran, differs` on damage that is not re-hashed would be a silent run "
             "of corrupted data; on a re-hashed manifest it is the run of what the edited manifest says.", "",
             "| damage | commands | clean error | ran, same output | ran, other output | traceback |",
             "|---|---|---|---|---|---|"]
    for kind in KINDS:
        c = Counter()
        for outcomes in result["counts"].get(kind, {}).values():
            c.update(outcomes)
        if c:
            lines.append(f"| {kind} | {c.total()} | {c['error']} | {c['ran, same']} | {c['ran, differs']} | "
                         f"**{c['traceback']}** |")
    lines += ["", f"Flipped data bytes inside what the command reads: {result['flips_read']}, of which "
              f"{result['flips_caught']} failed their sha256 check.", "",
              "A sample of the error messages (one per kind of damage and command):", ""]
    lines += [f"- {r['kind']}, `{r['command']}` ({r['damage']}): {r['message'][:200]}" for r in result["error_samples"]]
    bad = [r for r in result["other"] if r["outcome"] == "traceback" or r["kind"] != REHASHED]
    if bad:
        lines += ["", "Failures:", ""] + [f"- {r['kind']}, `{r['command']}` ({r['damage']}): {r['outcome']} "
                                          f"{(r['message'] or '')[:200]}" for r in bad]
    return "\n".join(lines) + "\n"


def main() -> None:
    from measure import command_line, save_results  # the script's folder is on sys.path

    from elastiq.runtime.resolve import resolve_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="smollm2-135m",
                        help="a checkpoint folder, or a model name whose cached checkpoint to use "
                             "(default smollm2-135m)")
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/elastiq-fuzz"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fuzz_checkpoints.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    good = Path(resolve_checkpoint(args.checkpoint, log=print))
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    start = time.perf_counter()
    result = fuzz(good, args.cases, args.seed, args.work, log=lambda line: print(line, file=sys.stderr, flush=True))
    result.update(checkpoint=good.name, cases=args.cases, seed=args.seed, seconds=round(time.perf_counter() - start),
                  command=command_line())
    kept = summary(result)
    save_results(args.output, kept, markdown(kept, command_line()))


if __name__ == "__main__":
    main()

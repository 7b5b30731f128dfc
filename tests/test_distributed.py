"""Compression on two ranks (torchrun, gloo, on the CPU) writes the one-process checkpoint, bit for
bit, and one stopped by a killed rank goes on from its last finished block."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastiq.checkpoint import WEIGHTS, Checkpoint
from elastiq.cli import main
from elastiq.compressor import distributed
from elastiq.compressor.distributed import one_process_threads

# The ranks run in processes of their own, where the tests' default kind weights (conftest) do not
# reach: every command compared with an in-process one names them.
KINDS = ["--kind-weights", "none"]
# 10 windows in chunks of 4: three chunks, so rank 1 runs a smaller last chunk in round 0's
# company and sits out round 1.
ARGS = ["--rates", "0.15,0.25", "--calib-samples", "10", "--calib-seqlen", "32", "--quality-windows", "2",
        "--no-recover", *KINDS]


def _torchrun(*args: str, cwd, ranks: int = 2, script: Path | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """``elastiq`` on ``ranks`` ranks, or ``script`` (which runs it) in its place. torchrun gives
    each rank OMP_NUM_THREADS=1 where the variable is unset, as it is for a user who never set it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"HF_HUB_OFFLINE": "1"} | (env or {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *(["-m", "elastiq"] if script is None else [str(script)]), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _fresh_thread_count(cwd: Path) -> int:
    """torch's thread count in a new process started without OMP_NUM_THREADS: a one-process run's."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def fresh_threads(tmp_path_factory) -> int:
    return _fresh_thread_count(tmp_path_factory.mktemp("threads"))


@pytest.fixture
def one_process(fresh_threads):
    """This process on a one-process run's thread count (whatever OMP_NUM_THREADS pytest runs under)."""
    before = torch.get_num_threads()
    torch.set_num_threads(fresh_threads)
    yield
    torch.set_num_threads(before)


def test_one_process_threads_on_a_rank_sets_the_one_process_count_and_restores(fresh_threads, tmp_path,
                                                                            monkeypatch):
    """A rank that torchrun started on one thread sorts, inside ``one_process_threads``, on the
    count a new one-process run takes (the rank's present count where the child cannot tell),
    and is back on its own count after, an error or not; outside a run of several ranks nothing
    changes."""
    fresh, before = fresh_threads, torch.get_num_threads()
    own = fresh + 1  # any count but the one-process one: the rank's own, to be restored
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it; the count is asked of a new process
    distributed.one_process_thread_count.cache_clear()
    try:
        torch.set_num_threads(own)
        with one_process_threads():  # one process: nothing changes
            assert torch.get_num_threads() == own
        monkeypatch.setattr(distributed, "world", lambda: (0, 2))
        with one_process_threads():
            assert torch.get_num_threads() == fresh
        assert torch.get_num_threads() == own
        with pytest.raises(KeyboardInterrupt):
            with one_process_threads():
                assert torch.get_num_threads() == fresh
                raise KeyboardInterrupt
        assert torch.get_num_threads() == own
        assert distributed.one_process_thread_count() == fresh
        distributed.one_process_thread_count.cache_clear()
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # where no child runs
        with pytest.warns(UserWarning, match="could not learn a one-process run's thread count"):
            assert distributed.one_process_thread_count() == own
    finally:
        distributed.one_process_thread_count.cache_clear()
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wide(tokenizer, tmp_path_factory) -> Path:
    """A 2-block Llama 256 wide with an MLP of 384: wide enough that LAPACK splits its
    eigen-decompositions and Cholesky factors over threads, whose number changes their last bits
    and with them the sorted V/O weights, as in a 1B model (a 64-wide model's change only at
    times: the 2-block tiny Llama's by chance never)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama", len(tokenizer))
    config.hidden_size, config.intermediate_size = 256, 384
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("wide")
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src


@pytest.mark.parametrize("quantize", [False, True], ids=["sorted", "quantized"])
def test_two_ranks_write_the_one_process_checkpoint(quantize, wide, one_process, tmp_path):
    """Rank 0 sorts on the one process's thread count though torchrun gives it one thread: one
    process on its threads and two ranks write the same bits."""
    src = wide
    extra = [] if quantize else ["--no-quantize"]
    one, two = tmp_path / "one.elastiq", tmp_path / "two.elastiq"
    main(["compress", str(src), "-o", str(one), *ARGS, *extra])
    done = _torchrun("compress", str(src), "-o", str(two), *ARGS, *extra, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = Checkpoint(one), Checkpoint(two)
    assert a.manifest["source"]["block_influence"] == b.manifest["source"]["block_influence"]
    assert a.manifest["tensors"] == b.manifest["tensors"]
    assert a.manifest["rates"] == b.manifest["rates"]  # the quality measured on rank 0, too
    assert (one / WEIGHTS).read_bytes() == (two / WEIGHTS).read_bytes()
    assert done.stderr.count("elastiq: wrote") == 1  # rank 0 reports, rank 1 is quiet
    assert not (tmp_path / "two.elastiq.stages").exists()


def test_three_ranks_and_a_mamba2_model(tokenizer, tmp_path):
    """Three ranks pass the running sums along the whole ring (0 -> 1 -> 2 -> 0); a Mamba2
    model's statistics are its mixers' inputs, concatenated in chunk order."""
    from test_mamba2 import build_mamba2

    src = tmp_path / "mamba2"
    build_mamba2(len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    args = ["--rates", "0.25", "--calib-samples", "10", "--calib-seqlen", "40", "--quality-windows", "0",
            "--no-recover", "--no-quantize", *KINDS]
    one, three = tmp_path / "one.elastiq", tmp_path / "three.elastiq"
    main(["compress", str(src), "-o", str(one), *args])
    done = _torchrun("compress", str(src), "-o", str(three), *args, cwd=tmp_path, ranks=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Checkpoint(one).manifest["tensors"] == Checkpoint(three).manifest["tensors"]
    assert (one / WEIGHTS).read_bytes() == (three / WEIGHTS).read_bytes()


@pytest.mark.parametrize("shard", [False, True], ids=["copies", "sharded"])
def test_recovery_on_two_ranks_trains_and_merges(shard, models, tmp_path):
    """Data-parallel recovery: two ranks, each on half of every step's batch, with averaged LoRA
    gradients (each rank with a copy of the model, or half of it under --shard: FSDP), merge the
    weights one process merges from the whole batch (up to float sums)."""
    src, _ = models["llama"]
    args = [*KINDS, "--rates", "0.35", "--calib-samples", "4", "--calib-seqlen", "32", "--quality-windows", "0",
            "--recover-steps", "3", "--no-quantize"]
    one, two, plain = (tmp_path / f"{n}.elastiq" for n in ("one", "two", "plain"))
    main(["compress", str(src), "-o", str(one), *args])
    main(["compress", str(src), "-o", str(plain), *args[:-3], "--no-recover", "--no-quantize"])
    done = _torchrun("compress", str(src), "-o", str(two), *args, *(["--shard"] if shard else []), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, p = (Checkpoint(x).read_rate(0.0) for x in (one, two, plain))
    trained = [n for n in a if n.endswith("q_proj.weight")]
    for name in trained:  # Adam's steps magnify float-sum differences in near-zero gradients: compare norms
        change, apart = (a[name] - p[name]).norm(), (a[name] - b[name]).norm()
        assert change > 0 and apart < 0.02 * change, (name, float(apart / change))
    assert Checkpoint(two).manifest["source"]["recovery"]["steps"] == 3


# Runs elastiq's command line on a torchrun rank (in place of ``-m elastiq``), writing down the blocks
# each rank calibrates; with ELASTIQ_TEST_KILL set, one rank SIGKILLs itself in block 2 of sorting.
RANK_SCRIPT = '''
import json, os, signal, sys, time
from pathlib import Path

from elastiq.compressor import compress as compress_module
from elastiq.compressor.progress import BlockProgress

rank, kill = int(os.environ["RANK"]), os.environ.get("ELASTIQ_TEST_KILL")
blocks = Path(os.environ["ELASTIQ_TEST_BLOCKS"])  # the sorting stage's progress folder
calibrate = compress_module.calibrate


def noted(*args, **kwargs):
    for index, stats in calibrate(*args, **kwargs):
        with open(os.environ["ELASTIQ_TEST_LOG"] + f"-rank{rank}.txt", "a") as log:
            log.write(f"{index} ")
        yield index, stats


def die_once(ready):
    deadline = time.monotonic() + 120
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def recorded():
    try:
        return json.loads((blocks / "progress.json").read_text())["blocks"]
    except FileNotFoundError:
        return 0


compress_module.calibrate = noted
if kill == "rank1-behind" and rank == 1:  # it dies before keeping block 2's activations, once rank 0 recorded block 2
    save = BlockProgress.save

    def saving(self, block, kept, activations):
        if block == 2:
            die_once(lambda: recorded() == 3)
        save(self, block, kept, activations)

    BlockProgress.save = saving
elif kill == "rank0-sorting" and rank == 0:  # it dies sorting block 2, once rank 1 kept block 2's activations
    sort = compress_module.sort_block

    def sorting(model, groups, *args, **kwargs):
        if groups[0].name.split(".")[1] == "2":  # group names start with the block's: layers.2.mlp
            die_once(lambda: (blocks / "activations-rank1-block2.safetensors").is_file())
        return sort(model, groups, *args, **kwargs)

    compress_module.sort_block = sorting

from elastiq.cli import main

sys.exit(main())
'''


@pytest.fixture(scope="module")
def four_blocks(tokenizer, fresh_threads, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 4-block Llama and its checkpoint compressed by one process (on a one-process run's
    threads), uninterrupted."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = 4
    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("four")
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    before = torch.get_num_threads()
    torch.set_num_threads(fresh_threads)
    try:
        main(["compress", str(root / "src"), "-o", str(root / "one.elastiq"), *ARGS, "--no-quantize"])
    finally:
        torch.set_num_threads(before)
    return root / "src", root / "one.elastiq"


@pytest.mark.parametrize("killed", ["rank1-behind", "rank0-sorting"])
def test_a_compression_whose_rank_is_killed_resumes_at_its_last_finished_block(killed, four_blocks, tmp_path):
    """A rank SIGKILLed in block 2 of 4 of sorting takes the launch down and leaves no checkpoint;
    the same command again goes on from block 2 on both ranks and writes the uninterrupted
    checkpoint. Killed a block behind rank 0 (``rank1-behind``: rank 0 recorded block 2, rank 1
    died before keeping its activations leaving it), or a block ahead of it (``rank0-sorting``:
    rank 1 kept them, rank 0 died sorting block 2), the ranks start again where both have the
    activations, and block 2 is calibrated and put again. The checkpoint is the one process's,
    bit for bit (this model's block 1 V/O weights change with rank 0's sorting threads)."""
    src, one = four_blocks
    out = tmp_path / "two.elastiq"
    folder = tmp_path / "two.elastiq.stages" / "sorting" / "blocks"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = ("compress", str(src), "-o", str(out), *ARGS, "--no-quantize")

    def run(name: str, kill: str | None = None) -> subprocess.CompletedProcess:
        env = {"ELASTIQ_TEST_BLOCKS": str(folder), "ELASTIQ_TEST_LOG": str(tmp_path / name)}
        return _torchrun(*command, cwd=tmp_path, script=script, env=env | ({"ELASTIQ_TEST_KILL": kill} if kill else {}))

    def calibrated(name: str) -> list[list[int]]:
        return [[int(b) for b in (tmp_path / f"{name}-rank{r}.txt").read_text().split()] for r in range(2)]

    stopped = run("stopped", killed)
    assert stopped.returncode != 0
    assert re.search(r"exitcode\s*:\s*-9", stopped.stderr), stopped.stderr[-3000:]  # a SIGKILL, not an error
    assert not out.exists()
    assert calibrated("stopped") == [[0, 1, 2], [0, 1, 2]]
    record = json.loads((folder / "progress.json").read_text())
    assert record["blocks"] == (3 if killed == "rank1-behind" else 2) and record["ranks"] == 2
    kept = {r: sorted(int(f.stem.rsplit("block", 1)[1]) for f in folder.glob(f"activations-rank{r}-block*.safetensors"))
            for r in range(2)}
    assert kept[0][-1] == record["blocks"] - 1 and kept[1][-1] == (1 if killed == "rank1-behind" else 2)

    resumed = run("resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert calibrated("resumed") == [[2, 3], [2, 3]]  # blocks 0 and 1 were not run again, on either rank
    assert not (tmp_path / "two.elastiq.stages").exists()
    a, b = Checkpoint(one), Checkpoint(out)
    assert a.manifest["source"]["block_influence"] == b.manifest["source"]["block_influence"]
    assert a.manifest["tensors"] == b.manifest["tensors"]
    assert a.manifest["rates"] == b.manifest["rates"]
    assert (one / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


# Runs ``elastiq recover`` on a torchrun rank, writing down the share of the weights this rank keeps
# once sharded; with ELASTIQ_TEST_KILL set, rank 0 SIGKILLs itself once the first state is saved.
SHARD_SCRIPT = '''
import os, signal, sys

from elastiq.compressor import recover as recover_module

rank = int(os.environ["RANK"])
shard, save = recover_module.shard_model, recover_module._save_state


def noted(model, blocks, mesh):
    shard(model, blocks, mesh)
    kept = sum(p.to_local().numel() for p in model.parameters())
    with open(os.environ["ELASTIQ_TEST_LOG"] + f"-rank{rank}.txt", "w") as log:
        log.write(f"{kept / sum(p.numel() for p in model.parameters())}")


def saving(*args, **kwargs):
    save(*args, **kwargs)
    if os.environ.get("ELASTIQ_TEST_KILL") and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)


recover_module.shard_model, recover_module._save_state = noted, saving

from elastiq.cli import main

sys.exit(main())
'''


@pytest.mark.parametrize("family", ["llama", "mamba2"])
def test_sharded_recovery_keeps_half_the_weights_a_rank_and_resumes_after_a_kill(family, models, tokenizer,
                                                                                 tmp_path):
    """Under --shard each of two ranks keeps half of the model (FSDP), and a run whose rank 0 is
    killed after its first saved state resumes from it and writes the uninterrupted run's bytes
    (a Mamba2 model too, whose convolutions' biases carry the state masks)."""
    if family == "mamba2":
        from test_mamba2 import build_mamba2

        src = tmp_path / "mamba2"
        build_mamba2(len(tokenizer)).save_pretrained(src)
        tokenizer.save_pretrained(src)
    else:
        src, _ = models["llama"]
    sorted_ = tmp_path / "sorted.elastiq"
    main(["compress", str(src), "-o", str(sorted_), "--rates", "0.35", "--calib-samples", "4", "--calib-seqlen",
          "32", "--quality-windows", "0", "--no-recover", "--no-quantize"])
    script = tmp_path / "rank.py"
    script.write_text(SHARD_SCRIPT)
    args = ["recover", str(sorted_), "--steps", "4", "--save-every", "2", "--batch", "2", "--samples", "4",
            "--seqlen", "16", "--bf16", "off", "--shard"]
    log = str(tmp_path / "kept")
    whole = _torchrun(*args, "-o", str(tmp_path / "whole.elastiq"), cwd=tmp_path, script=script,
                      env={"ELASTIQ_TEST_LOG": log})
    assert whole.returncode == 0, whole.stderr[-3000:]
    for rank in (0, 1):
        assert float(Path(f"{log}-rank{rank}.txt").read_text()) == pytest.approx(0.5, abs=0.01)

    out = tmp_path / "resumed.elastiq"
    killed = _torchrun(*args, "-o", str(out), cwd=tmp_path, script=script,
                       env={"ELASTIQ_TEST_LOG": log, "ELASTIQ_TEST_KILL": "1"})
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr
    state = tmp_path / "resumed.elastiq.state"
    assert not out.exists() and json.loads((state / "state.json").read_text())["step"] == 2
    resumed = _torchrun(*args, "-o", str(out), cwd=tmp_path, script=script, env={"ELASTIQ_TEST_LOG": log})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2/4" in resumed.stderr and not state.exists()  # went on from the saved step
    assert (out / WEIGHTS).read_bytes() == (tmp_path / "whole.elastiq" / WEIGHTS).read_bytes()

"""Recovery fine-tuning: LoRA trained into the nested checkpoint, for every offered rate at once.

A sorted model's q/k channels are permuted (RoPE gathered by ``rope_pairs``), so training runs on
elastiq's own elastic model at full width (rate 0 of a float checkpoint) with PEFT LoRA injected
into every projection of the blocks. A rate is applied with forward hooks that zero exactly what
the deployed slice cuts (``UnitMasks``): the down projection's input channels beyond the kept MLP
width, each KV head's V rank beyond r (which is all the output projection sees of it), and the dropped
rotary pairs' two channels in both the query and key projections' outputs; in a Mamba2 block, the
channels beyond the kept P of each head at its gated norm (whose mean is then taken over the kept
ones) and the states beyond the kept N of each group in B and C. A hybrid's blocks of one branch
(Nemotron-H) are masked the same way: an MLP alone, ungated, at its down projection's input,
attention alone at its value projection's output. The masked full model computes the sliced
model, before and after LoRA is merged back. LoRA wraps the projections only (a Mamba2 block's
depthwise convolutions, dt_bias, A, D and the norms stay frozen).

Two methods:
- ``nested``: at each step one offered rate is drawn, the larger ones more often (probability of
  the i-th smallest offered rate, rate 0 included, proportional to i + 1), and its masked model
  is trained on C4 windows towards a teacher, KL(teacher || masked model) at a temperature, plus
  ``lm_weight`` times the next-token loss. The teacher is the dense model by default
  (``teacher="dense"``: the starting weights, frozen, unpruned, unquantized) or the full-width
  pass of the same LoRA model (``teacher="self"``, detached). The default, distillation from the
  dense model alone, measured closest to the dense model at every rate
  (``benchmarks/results/distillation.md``). Merged, the sort order and every width stay as they
  were.
- ``lorashear`` (after LoRAShear, Chen et al. 2023, simplified): a warm-up and ``prune_periods``
  periods of progressive structured pruning, then knowledge recovery. A unit's importance is the
  first-order Taylor term |W . g| summed over its members' weights, with the frozen weight's
  gradient g taken through the LoRA product, g ~ s (dL/dB A + B dL/dA) (what LoRA moves W by per
  unit of learning rate). At the start of each period the least important surviving units of
  each group are chosen (per KV head for Q/K and V/O) and their channels are scaled from 1 down
  to 0 over the period, until rate R's widths are reached; the recovery phase then trains with
  those units at zero, drawing each step's data source with probability proportional to its
  held-out loss increase relative to the dense model (re-measured each period). The only
  training source elastiq carries is the C4 sample (its data holds no licensed
  instruction-style text), so that draw is over one source. The units are finally re-sorted so
  that the kept ones form the prefix, and the checkpoint offers rates 0 and R. Simplifications:
  widths per group come from elastiq's allocation (the checkpoint's own row when it offers R),
  not from a global importance ranking, and the decay is a scale on the unit's output, not
  LoRAShear's half-space projection of the weights.

Every step draws its rate, batch and source from its own generator seeded by (seed, step), so a
run resumed from the state folder (LoRA weights, optimizer, step, and LoRAShear's importances and
choices, saved every ``save_every`` steps beside the output) gives the same weights as one that
never stopped; the state is removed once the checkpoint is written.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .. import ElastiqError
from ..atomic import atomic_path, sweep
from ..checkpoint import MLP, checkpoint_output, QK, SSM_N, SSM_P, VO, Checkpoint, Group, Heads, RateSpec, write_checkpoint
from ..families import Family, checkpoint_family, family_for
from ..families.base import ATTN_K, ATTN_Q, ATTN_V, FFN_DOWN, MASKS, MATRICES, SSM_MATRICES
from ..layouts import from_storage, to_storage
from ..modeling.model import Transformer
from ..modeling.ssm import SiLUGate
from ..paths import data_dir
from .allocate import MAX_RATE, allocate_checkpoint
from .calibrate import C4_SAMPLE, calibration_samples
from .devices import compute_device, to_device
from .distributed import average_gradients, like, shard_mesh, shard_model, synchronize, whole, world

METHODS = ("nested", "lorashear")
TEACHERS = ("dense", "self")
ADAPTER = "default"


class RecoverError(ElastiqError):
    """Recovery was asked for something it cannot do: bad options, a quantized checkpoint, no data."""


@dataclass
class RecoverOptions:
    """How to fine-tune (recorded in the manifest's ``source["recovery"]``).

    ``distill`` weighs the KL term of distillation from ``teacher`` (0: off) and ``lm_weight`` the
    next-token loss on the training text; ``rate`` is LoRAShear's target;
    ``prune_fraction`` of the steps go to LoRAShear's warm-up and pruning periods. ``samples`` C4
    windows of ``seqlen`` tokens form the training pool; each step takes ``batch`` of them.
    """

    method: str = "nested"
    steps: int = 200
    lr: float = 3e-4
    rank: int = 8
    alpha: float = 16.0
    batch: int = 4
    seqlen: int = 256
    samples: int = 512
    distill: float = 1.0
    teacher: str = "dense"
    lm_weight: float = 0.0
    temperature: float = 1.0
    rate: float = 0.25
    prune_periods: int = 3
    prune_fraction: float = 0.5
    heldout: int = 8
    bf16: bool | None = None  # bf16 autocast; None: where the device computes bf16 natively
    device: str = "auto"  # where training computes (devices.py)
    shard: bool = False  # on several ranks, shard the weights over them (FSDP) instead of a copy each
    seed: int = 0
    save_every: int = 25
    timings: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """The options that decide the result (a resumed run must be given the same)."""
        return {k: v for k, v in asdict(self).items() if k not in ("timings", "save_every")}


@dataclass
class Recovered:
    """The result of training: the merged full-width weights (Hugging Face names, sort order
    unchanged), LoRAShear's kept units per group (bool [W] or [W, G]; None for ``nested``), the
    trained LoRA model (un-merged) and the rates the output offers with their widths."""

    weights: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor] | None
    model: Transformer
    rates: list[RateSpec]


# --- masks: a rate, or any per-unit scale, applied to the full model with forward hooks ---------

def unit_shape(group: Group, heads: Heads | None) -> tuple[int, ...]:
    """Shape of a per-unit tensor of ``group``: [W, G] per KV head for Q/K pairs and V/O ranks, else
    [W] (MLP channels; an SSM block's P channels and N states, the same units in every head and group)."""
    return (group.width, heads.num_kv_heads) if group.kind in (QK, VO) else (group.width,)


def width_units(groups: Sequence[Group], heads: Heads | None, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per-unit 0/1 scales that keep the first ``widths[g]`` units of every group."""
    out = {}
    for g in groups:
        keep = (torch.arange(g.width) < widths[g.name]).float()
        out[g.name] = keep[:, None].expand(unit_shape(g, heads)).contiguous() if g.kind in (QK, VO) else keep
    return out


class _Scaled(nn.Module):
    """A parametrization that scales a tensor by ``channels[path]`` (unchanged when there is none)."""

    def __init__(self, channels: Mapping[str, torch.Tensor], path: str):
        super().__init__()
        self.channels, self.path = channels, path

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        m = self.channels.get(self.path)
        return t if m is None else t * m.to(t.device, t.dtype)


class UnitMasks:
    """Hooks on a full-width elastic model (LoRA-wrapped or not) that scale each prunable unit's
    channels: ``set(width_units(...))`` makes the model compute that rate's slice exactly;
    ``set(None)`` runs the full model.

    An SSM block's P channels are masked at its gated norm's input y, scaled by sqrt(P / kept) there
    and back at the norm's output, so that the norm's mean over each group of channels is the mean
    over the kept ones, as in the sliced block; nothing before the norm needs a mask, since each
    channel of y depends on its own x channel only. Its N states are masked at the B and C
    projections' outputs and in their convolutions' biases (a parametrization, since the mixer reads
    the convolution's weights): a cut state then reads zero after the convolution and its SiLU and
    adds nothing to y."""

    def __init__(self, model: nn.Module, groups: Sequence[Group], heads: Heads | None):
        self.groups, self.heads = list(groups), heads
        self._channels: dict[str, torch.Tensor] = {}  # by module path: the scale of its masked channels
        self._after: dict[str, torch.Tensor] = {}  # by gated norm: the scale of its output
        self._sizes: dict[str, int] = {}  # by module path: how many channels it masks
        self._handles, self._parametrized = [], []
        for g in self.groups:
            for slot, what in MASKS[g.kind]:
                self._hook(model, f"layers.{g.layer}.{slot}", what)

    def _hook(self, model: nn.Module, path: str, what: str) -> None:
        module = model.get_submodule(path)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if what == "bias":
            if base.bias is None:
                return  # a convolution without bias: the masked projection output is all it reads
            self._sizes[path] = base.bias.shape[0]
            parametrize.register_parametrization(module, "bias", _Scaled(self._channels, path))
            self._parametrized.append(module)
            return
        # a mixer's gate without a norm (Falcon-H1's) holds no weight: masked all the same, its gain cancels
        self._sizes[path] = base.width if isinstance(base, SiLUGate) else base.weight.shape[1 if what == "input" else 0]
        if what in ("input", "gated_norm"):
            def scale_input(mod, args):
                m = self._channels.get(path)
                return None if m is None else (args[0] * m.to(args[0].device, args[0].dtype), *args[1:])
            self._handles.append(module.register_forward_pre_hook(scale_input))
        if what in ("output", "gated_norm"):
            after = self._after if what == "gated_norm" else self._channels

            def scale_output(mod, args, out):
                m = after.get(path)
                return None if m is None else out * m.to(out.device, out.dtype)
            self._handles.append(module.register_forward_hook(scale_output))

    def set(self, units: Mapping[str, torch.Tensor] | None) -> None:
        """Scale every group's units by ``units[group]`` (shape ``unit_shape``), or none at all."""
        self._channels.clear()
        self._after.clear()
        if units is None:
            return
        for g in self.groups:
            u, p = units[g.name].float(), f"layers.{g.layer}."
            if g.kind == MLP:
                self._channels[p + FFN_DOWN] = u
            elif g.kind == QK:  # a pair is two channels of every query head of the KV group and of its key head
                G, Q = self.heads.num_kv_heads, self.heads.num_heads // self.heads.num_kv_heads
                self._channels[p + ATTN_Q] = from_storage(u[:, :, None, None].expand(-1, G, Q, 2), "q", self.heads)
                self._channels[p + ATTN_K] = from_storage(u[:, :, None].expand(-1, G, 2), "k", self.heads)
            elif g.kind == VO:
                self._channels[p + ATTN_V] = from_storage(u, "v", self.heads)
            else:  # an SSM group: its units repeat in every head (P) or group (N) of the channels
                for slot, what in MASKS[g.kind]:
                    if p + slot not in self._sizes:
                        continue
                    m = u.repeat(self._sizes[p + slot] // g.width)
                    if what == "gated_norm":
                        gain = math.sqrt(g.width / u.sum().item())
                        m, self._after[p + slot] = m * gain, torch.tensor(1 / gain)
                    self._channels[p + slot] = m

    def remove(self) -> None:
        """Take the hooks and parametrizations off the model."""
        for h in self._handles:
            h.remove()
        for module in self._parametrized:
            parametrize.remove_parametrizations(module, "bias", leave_parametrized=False)
        self._handles, self._parametrized = [], []


# --- LoRA: inject, merge ---------------------------------------------------------------------------

def lora_model(weights: Mapping[str, torch.Tensor], config: Mapping, rank: int, alpha: float,
               seed: int) -> Transformer:
    """The elastic model of ``weights`` (frozen) with PEFT LoRA in every projection of its blocks;
    the LoRA initialisation is drawn from ``seed`` without touching the global generator."""
    from peft import LoraConfig, inject_adapter_in_model

    model = Transformer.from_weights(weights, config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=[*MATRICES, *SSM_MATRICES]), model, adapter_name=ADAPTER)
    return model


def lora_layers(model: nn.Module, family: Family) -> dict[str, nn.Module]:
    """The LoRA-wrapped projections of ``model`` by checkpoint weight name."""
    from peft.tuners.lora import LoraLayer

    return {family.checkpoint_name(f"{name}.weight"): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """``weights`` (the frozen ones the LoRA model was built on) with every LoRA-wrapped projection
    replaced by W + s B A (PEFT's delta weight); the LoRA model itself is left un-merged. Sharded
    LoRA weights are gathered whole (every rank must call this; a rank that writes nothing may
    pass no ``weights``)."""
    out = dict(weights)
    for name, layer in lora_layers(model, family).items():
        a, b = (whole(m[ADAPTER].weight) for m in (layer.lora_A, layer.lora_B))
        if name in out:
            out[name] = (out[name] + (b @ a).to(out[name].device) * layer.scaling[ADAPTER]).contiguous()
    return out


# --- checks ----------------------------------------------------------------------------------------

def native_bf16(device: torch.device = torch.device("cpu")) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CPU with AVX-512 BF16 or AMX, a GPU that
    CUDA says supports bf16. Without it, bf16 autocast is emulated: measured 29x slower than
    float32 on an AVX2-only EPYC (a 1024 x 576 x 1536 matmul with its backward)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _check_options(options: RecoverOptions, ckpt: Checkpoint, data: Path) -> None:
    positive = {"steps": options.steps, "rank": options.rank, "batch": options.batch, "samples": options.samples,
                "save_every": options.save_every, "prune_periods": options.prune_periods,
                "heldout": options.heldout}
    for name, value in positive.items():
        if value <= 0:
            raise RecoverError(f"{name} must be a positive integer, got {value}")
    if options.seqlen < 2:
        raise RecoverError(f"seqlen must be at least 2 tokens, got {options.seqlen}")
    if not (options.lr > 0 and options.alpha > 0 and options.temperature > 0 and options.distill >= 0):
        raise RecoverError(f"lr ({options.lr}), alpha ({options.alpha}) and temperature ({options.temperature}) "
                           f"must be positive and distill ({options.distill}) at least 0")
    if options.method not in METHODS:
        raise RecoverError(f"unknown recovery method {options.method!r}; known: {', '.join(METHODS)}")
    if options.teacher not in TEACHERS:
        raise RecoverError(f"unknown teacher {options.teacher!r}; known: {', '.join(TEACHERS)}")
    if not options.lm_weight >= 0 or (options.lm_weight == 0 and options.distill == 0):
        raise RecoverError(f"lm_weight ({options.lm_weight}) must be at least 0, and distill ({options.distill}) "
                           "positive when it is 0: the training needs a loss")
    if options.method == "lorashear":
        ssm = sorted({g.kind for g in ckpt.groups if g.kind in (SSM_P, SSM_N)})
        if ssm:
            raise RecoverError(f"LoRAShear's progressive pruning is built for attention and MLP groups only; "
                               f"{ckpt.path.name} has SSM groups ({', '.join(ssm)}): recover it with the nested method")
        if not 0 < options.rate < MAX_RATE:
            raise RecoverError(f"LoRAShear's rate must lie in (0, {MAX_RATE}), got {options.rate}")
        if not 0 < options.prune_fraction < 1:
            raise RecoverError(f"prune_fraction must lie in (0, 1), got {options.prune_fraction}")
        if options.steps < options.prune_periods + 2:
            raise RecoverError(f"LoRAShear needs at least prune_periods + 2 = {options.prune_periods + 2} steps "
                               f"(warm-up, pruning periods, recovery); got {options.steps}")
    ranks = world()[1]
    if ranks > 1 and (options.method != "nested" or options.batch % ranks):
        raise RecoverError(f"recovery on {ranks} ranks is data-parallel: it needs the nested method and a batch "
                           f"that the ranks divide (got {options.method}, batch {options.batch})")
    if ckpt.quantization:
        raise RecoverError(f"{ckpt.path} is quantized ({ckpt.quantization['format']}); recover the "
                           "float checkpoint that `elastiq compress` wrote, then quantize the result")
    if not (data / C4_SAMPLE).is_file():
        raise RecoverError(f"training data {data / C4_SAMPLE} is missing; recovery trains on the C4 sample of the "
                           "data folder (set $ELASTIQ_DATA to a folder that holds c4/, or unset it to use the data "
                           "elastiq carries)")


# --- the rates trained for, and LoRAShear's widths ---------------------------------------------------

def rate_probabilities(rates: Sequence[float]) -> dict[float, float]:
    """The nested method's draw: the i-th smallest rate (rate 0 first) with probability ∝ i + 1."""
    ordered = sorted(rates)
    total = sum(range(1, len(ordered) + 1))
    return {r: (i + 1) / total for i, r in enumerate(ordered)}


def _target_rates(ckpt: Checkpoint, options: RecoverOptions) -> list[RateSpec]:
    """The rates the output offers: the checkpoint's own (nested), or 0 and R (LoRAShear), with
    R's widths from the checkpoint's row if it offers R, else from elastiq's allocation."""
    if options.method == "nested":
        return [RateSpec(r["rate"], r["widths"]) for r in ckpt.rate_table]
    full = RateSpec(0.0, {g.name: g.width for g in ckpt.groups})
    if any(abs(r - options.rate) < 1e-9 for r in ckpt.rates):
        return [full, RateSpec(options.rate, ckpt.rate_entry(options.rate)["widths"])]
    specs = allocate_checkpoint(ckpt, [options.rate])
    return [full, specs[-1]]


def source_weights(dense: Mapping[str, float], current: Mapping[str, float]) -> dict[str, float]:
    """LoRAShear's dynamic data draw: each source's probability is proportional to its relative
    loss increase over the dense model, (current - dense) / dense, floored at 1e-3 so that no
    source is starved."""
    rise = {k: max((current[k] - dense[k]) / dense[k], 1e-3) for k in dense}
    total = sum(rise.values())
    return {k: v / total for k, v in rise.items()}


# --- LoRAShear's schedule -----------------------------------------------------------------------------

class Shear:
    """LoRAShear's state: accumulated importance and the period in which each unit was chosen
    for pruning (-1: kept), per group; the scales a step runs with follow from them."""

    def __init__(self, groups: Sequence[Group], heads: Heads, targets: Mapping[str, int], options: RecoverOptions):
        self.groups, self.heads, self.targets = list(groups), heads, dict(targets)
        self.periods = options.prune_periods
        self.period = max(1, int(options.steps * options.prune_fraction) // (options.prune_periods + 1))
        self.importance = {g.name: torch.zeros(unit_shape(g, heads), dtype=torch.float64) for g in groups}
        self.chosen = {g.name: torch.full(unit_shape(g, heads), -1, dtype=torch.int64) for g in groups}

    @property
    def recovery_start(self) -> int:
        return (self.periods + 1) * self.period

    def begin(self, step: int) -> None:
        """At the start of pruning period k, choose the next units (least important surviving ones)
        so that k + 1 of the periods' equal shares of each group's pruned units are chosen."""
        if step < self.period or step >= self.recovery_start or step % self.period:
            return
        k = step // self.period - 1
        for g in self.groups:
            chosen = self.chosen[g.name].view(g.width, -1)
            total = g.width - self.targets[g.name]
            new = round(total * (k + 1) / self.periods) - round(total * k / self.periods)
            if new:
                score = self.importance[g.name].view(g.width, -1).masked_fill(chosen >= 0, math.inf)
                rows = score.argsort(dim=0, stable=True)[:new]
                chosen.scatter_(0, rows, k)
            self.importance[g.name].zero_()

    def scales(self, step: int) -> dict[str, torch.Tensor] | None:
        """Per-unit scales at ``step``: units chosen in period k fall linearly from 1 to 0 over
        that period and stay at 0; None while nothing is chosen yet (the warm-up)."""
        if step < self.period:
            return None
        out = {}
        for name, chosen in self.chosen.items():
            start = (chosen + 1) * self.period
            fall = 1 - (step - start + 1).clamp_min(0).float() / self.period
            out[name] = torch.where(chosen >= 0, fall.clamp_min(0), torch.ones(()))
        return out

    def keep(self) -> dict[str, torch.Tensor]:
        return {name: chosen < 0 for name, chosen in self.chosen.items()}

    @torch.no_grad()
    def accumulate(self, layers: Mapping[str, nn.Module]) -> None:
        """Add |W . g| per unit, g the frozen weight's gradient through the LoRA product."""
        for g in self.groups:
            total = self.importance[g.name]
            for name, role in g.members:
                layer = layers.get(name)
                if layer is None:  # biases and rotary pair indices carry no LoRA
                    continue
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if a.grad is None or b.grad is None:
                    continue
                grad = layer.scaling[ADAPTER] * (b.grad @ a + b @ a.grad)
                s = to_storage((layer.get_base_layer().weight * grad).abs(), role, self.heads)
                keep = 1 if g.kind == MLP else 2
                total += s.double().reshape(*s.shape[:keep], -1).sum(-1).to(total.device)

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"importance.{k}": v for k, v in self.importance.items()},
                **{f"chosen.{k}": v for k, v in self.chosen.items()}}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in self.importance:
            self.importance[name] = tensors[f"importance.{name}"].clone()
            self.chosen[name] = tensors[f"chosen.{name}"].clone()


# --- the state folder -------------------------------------------------------------------------------------

def state_dir(output: Path) -> Path:
    """Where an interrupted run of ``output`` keeps its state: ``NAME.elastiq.state`` beside it."""
    return output.with_name(output.name + ".state")


def _save_state(path: Path, step: int, settings: dict, source: str, model: nn.Module,
                optimizer: torch.optim.Optimizer, extra: Mapping[str, torch.Tensor], info: dict) -> None:
    """Write the state folder under a temporary name and rename it into place (rank 0; every rank
    calls this in a sharded run, to gather the state whole)."""
    from safetensors.torch import save_file

    tensors = {n: whole(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    optimizer_state = _optimizer_state(model, optimizer)
    if world()[0] != 0:  # a sharded run's other ranks only helped gather the state
        return
    with atomic_path(path, directory=True) as tmp:
        save_file({**{f"lora.{k}": v for k, v in tensors.items()}, **extra}, str(tmp / "state.safetensors"))
        buffer = io.BytesIO()  # torch.save's own file writer says a full disk with a RuntimeError, no errno
        torch.save(optimizer_state, buffer)
        (tmp / "optimizer.pt").write_bytes(buffer.getbuffer())
        (tmp / "state.json").write_text(json.dumps({"step": step, "checkpoint": source, "settings": settings,
                                                    "schedule": info}, indent=1))


def _load_state(path: Path, settings: dict, source: str, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore LoRA weights and optimizer from ``path``; returns (step, other tensors, schedule info)."""
    from safetensors.torch import load_file

    info = json.loads((path / "state.json").read_text())
    if info["settings"] != settings or info["checkpoint"] != source:
        changed = sorted(k for k in settings if info["settings"].get(k) != settings[k])
        raise RecoverError(f"{path} holds the state of a run with other settings ({', '.join(changed) or 'checkpoint'} "
                           f"differ); rerun with the same options to resume, or delete {path} to start afresh")
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("lora."):
                param = params[name.removeprefix("lora.")]
                param.copy_(like(param, value))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)
    return info["step"], {k: v for k, v in tensors.items() if not k.startswith("lora.")}, info["schedule"]


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state to save: as it is, or gathered whole onto rank 0 (by parameter name)
    where the model is sharded."""
    if not _sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- training -----------------------------------------------------------------------------------------------

@contextmanager
def adapters_off(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Every LoRA layer of ``layers`` computes its base layer alone: the model is the frozen dense
    one (PEFT's own switch, set directly: ``enable_adapters`` would also change the LoRA weights'
    ``requires_grad``, which sharded training fixes when it starts)."""
    layers = list(layers)
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def _loss(model: nn.Module, masks: UnitMasks, ids: torch.Tensor, scales: Mapping[str, torch.Tensor] | None,
          options: RecoverOptions, layers: Mapping[str, nn.Module] | None = None) -> torch.Tensor:
    """``lm_weight`` x the next-token loss of the masked model, plus ``distill`` x T^2 x
    KL(teacher || masked) at temperature T when distilling: the teacher is the frozen dense model,
    ``model`` with its LoRA ``layers`` off, if they are given, else the full-width pass of
    ``model`` (then only on masked steps)."""
    ids = ids.to(model.device)  # drawn on the CPU: the same batches on every device
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=options.bf16):
        target = None
        if options.distill and (layers is not None or scales is not None):
            masks.set(None)
            with torch.no_grad(), adapters_off(layers.values() if layers is not None else ()):
                target = model(ids).float().flatten(0, 1)
        masks.set(scales)
        logits = model(ids).float().flatten(0, 1)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).flatten()
    loss = options.lm_weight * F.cross_entropy(logits, targets, ignore_index=-100) if options.lm_weight else 0.0
    if target is None:
        return loss
    t = options.temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1), log_target=True,
                  reduction="batchmean")
    return loss + options.distill * t * t * kl


@torch.no_grad()
def _heldout_loss(model: nn.Module, masks: UnitMasks, windows: torch.Tensor,
                  scales: Mapping[str, torch.Tensor] | None, options: RecoverOptions) -> float:
    """The next-token loss on held-out windows (LoRAShear's measure of each source, whatever the
    training loss: the dense model's distillation loss against itself would be zero)."""
    lm = replace(options, lm_weight=1.0, distill=0.0)
    return sum(_loss(model, masks, w[None], scales, lm).item() for w in windows) / len(windows)


def _lora_model(ckpt: Checkpoint, options: RecoverOptions, weights: Mapping[str, torch.Tensor]
                ) -> tuple[Transformer, UnitMasks]:
    """The LoRA model of ``weights`` (``ckpt``'s at rate 0) and its unit masks."""
    model = lora_model(weights, ckpt.config, options.rank, options.alpha, options.seed)
    return model, UnitMasks(model, ckpt.groups, ckpt.heads)


def recover(ckpt: Checkpoint, options: RecoverOptions, data: Path, state: Path | None = None,
            progress: bool = True) -> Recovered:
    """Train LoRA on the full-width model of the float checkpoint ``ckpt`` as ``options`` say and
    merge it; resume from (and keep saving to) the state folder ``state`` if given."""
    _check_options(options, ckpt, data)
    device = compute_device(options.device)
    if options.bf16 is None:  # settled before the settings are compared with a saved state or recorded
        options.bf16 = native_bf16(device)
    start = time.perf_counter()
    rank, ranks = world()
    sharded = options.shard and ranks > 1
    config = ckpt.config
    rates = _target_rates(ckpt, options)
    tokenizer = ckpt.tokenizer()
    windows = calibration_samples(tokenizer, data / C4_SAMPLE, options.samples + options.heldout, options.seqlen,
                                  options.seed)
    sources = {"c4": windows[:options.samples]}
    heldout = {"c4": windows[options.samples:]}

    if sharded:  # each rank in turn reads the model whole on the CPU, and FSDP moves its shards to the device
        mesh = shard_mesh(device)
        for turn in range(ranks):
            if turn == rank:
                model, masks = _lora_model(ckpt, options, ckpt.read_rate(0.0))
                shard_model(model, list(model.layers), mesh)
            synchronize()  # one whole model in host memory at a time
    else:
        weights = to_device(ckpt.read_rate(0.0), device)
        model, masks = _lora_model(ckpt, options, weights)
    layers = lora_layers(model, family_for(config))
    teacher = layers if options.distill and options.teacher == "dense" else None  # the model, LoRA off
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    settings = options.settings()
    shear = None
    if options.method == "lorashear":
        shear = Shear(ckpt.groups, ckpt.heads, rates[-1].widths, options)
    probabilities = rate_probabilities([r.rate for r in rates])
    rate_units = {r.rate: None if r.rate == 0 else width_units(ckpt.groups, ckpt.heads, r.widths) for r in rates}

    step, info = 0, {}
    if state is not None and rank == 0:
        sweep(state)  # a save killed between its two renames left the previous state aside
    synchronize()
    if state is not None and state.exists():
        step, extra, info = _load_state(state, settings, str(ckpt.path.resolve()), model, optimizer)
        if shear is not None:
            shear.load(extra)
    if shear is not None and "dense_loss" not in info:
        info["dense_loss"] = {k: _heldout_loss(model, masks, w, None, options) for k, w in heldout.items()}
        info["source_weights"] = {k: 1 / len(sources) for k in sources}
    names = list(sources)
    draw = torch.tensor([probabilities[r.rate] for r in rates])

    step_seconds = []
    bar = tqdm(range(step, options.steps), initial=step, total=options.steps, desc=f"recover ({options.method})",
               disable=not progress, leave=False)
    for step in bar:
        tick = time.perf_counter()
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        if shear is None:
            rate = rates[int(torch.multinomial(draw, 1, generator=g))].rate
            scales, source = rate_units[rate], "c4"
        else:
            shear.begin(step)
            scales = shear.scales(step)
            if step >= shear.recovery_start and (step - shear.recovery_start) % shear.period == 0:
                current = {k: _heldout_loss(model, masks, w, scales, options) for k, w in heldout.items()}
                info["source_weights"] = source_weights(info["dense_loss"], current)
            source = "c4"
            if step >= shear.recovery_start:
                p = torch.tensor([info["source_weights"][k] for k in names])
                source = names[int(torch.multinomial(p, 1, generator=g))]
            rate = options.rate if scales is not None else 0.0
        pool = sources[source]
        ids = pool[torch.randint(len(pool), (options.batch,), generator=g)][rank::ranks]  # this rank's share
        loss = _loss(model, masks, ids, scales, options, teacher)
        loss.backward()
        if not sharded:  # FSDP reduces a sharded model's gradients itself
            average_gradients(params)
        if shear is not None and step < shear.recovery_start:
            shear.accumulate(layers)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", rate=rate)
        step_seconds.append(time.perf_counter() - tick)
        done = step + 1
        if state is not None and (rank == 0 or sharded) and done % options.save_every == 0 and done < options.steps:
            _save_state(state, done, settings, str(ckpt.path.resolve()), model, optimizer,
                        shear.state() if shear else {}, info)
    masks.remove()
    options.timings["train"] = time.perf_counter() - start
    options.timings["step_seconds"] = step_seconds
    if sharded:  # only the LoRA weights changed: the frozen ones are read again, by rank 0 alone
        weights = ckpt.read_rate(0.0) if rank == 0 else {}
    return Recovered(merged_weights(model, weights, family_for(config)), shear.keep() if shear else None, model, rates)


# --- LoRAShear's re-sort ------------------------------------------------------------------------------------

def resort(weights: Mapping[str, torch.Tensor], groups: Sequence[Group], heads: Heads,
           keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permute every group's units so that the kept ones come first (each side in its old order),
    consistently over the group's members (rotary pair indices included): the model is unchanged."""
    out = dict(weights)
    for g in groups:
        k = keep[g.name]
        order = (~k).to(torch.int8).argsort(dim=0, stable=True)
        index = order if g.kind == MLP else (order, torch.arange(heads.num_kv_heads)[None])
        for name, role in g.members:
            out[name] = from_storage(to_storage(out[name], role, heads)[index], role, heads).contiguous()
    return out


def recover_checkpoint(checkpoint: str | Path, output: str | Path, options: RecoverOptions | None = None,
                       overwrite: bool = False, data: Path | None = None, progress: bool = True) -> Path:
    """Fine-tune the float nested checkpoint ``checkpoint`` and write the result to ``output``:
    same groups and layout; the same rates (``nested``) or rates 0 and R (``lorashear``)."""
    options = options or RecoverOptions()
    ckpt = Checkpoint(checkpoint)
    checkpoint_family(ckpt)  # its config and tensors describe one model
    output = checkpoint_output(output, overwrite, RecoverError)
    data = data or data_dir()
    _check_options(options, ckpt, data)
    state = state_dir(output)
    result = recover(ckpt, options, data, state, progress)
    if world()[0] != 0:  # every rank holds the same merged weights; rank 0 writes them
        return output
    weights = result.weights
    if result.keep is not None:
        weights = resort(weights, ckpt.groups, ckpt.heads, result.keep)
    source = dict(ckpt.source.record)
    source["recovery"] = {**options.settings(), "from": ckpt.path.name, "data": {"c4": str(C4_SAMPLE)},
                          "tokens": options.steps * options.batch * options.seqlen,
                          "train_seconds": round(options.timings["train"], 1)}
    if options.method == "nested":
        source["recovery"]["rate_probabilities"] = {str(r): p for r, p in
                                                    rate_probabilities([s.rate for s in result.rates]).items()}
    t = time.perf_counter()
    path = write_checkpoint(output, weights, ckpt.groups, result.rates, ckpt.heads, source, ckpt.tokenizer(),
                            overwrite=overwrite)
    options.timings["write"] = time.perf_counter() - t
    shutil.rmtree(state, ignore_errors=True)
    return path

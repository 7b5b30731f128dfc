"""elastiq's own CPU ops (``cpu_ops.cpp``), compiled once per machine and registered as ``torch.ops.elastiq``.

``q4_matmul`` multiplies bfloat16 activations by a Q4_0 matrix held as the checkpoint's own blocks
(``q4_cpu``), the way llama.cpp does (byte dot products of each block, activations quantized per
block, here to 12 bits split into two bytes; AVX-512 VNNI, AVX2 or a portable loop, whichever is
best on this CPU, ``torch.ops.elastiq.cpu_isas()`` lists them): torch's int4 CPU op dequantizes its
tiles to bfloat16 first, and on a CPU without AVX-512 that made SmolLM2's decode step compute-bound
(17 ms of a 27 ms step on a 2-core AVX2 EPYC). ``rms_norm`` and ``rope_gather_`` do in one call what the
torch paths do in a dozen ops each, whose dispatch costs more than their arithmetic for one token.

The source is compiled with torch's extension builder (a C++ compiler and ninja; ~10 s on 2
cores) into ``$ELASTIQ_CACHE/kernels``, once per source, torch version and machine. Where that
fails, one line on stderr says why and the torch paths run; ``ELASTIQ_CPU_KERNEL=torch`` asks for
the torch paths (to compare them, or to rule these ops out).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "cpu_ops.cpp"
KERNEL_ENV = "ELASTIQ_CPU_KERNEL"


def cpu_ops_built() -> bool:
    """Whether elastiq's CPU ops run in this process: False where ``ELASTIQ_CPU_KERNEL=torch`` asks
    for the torch paths (read on every call, so a test or a benchmark may switch), else whether they
    are built (compiling them on first use on this machine; where they cannot be, one line on stderr
    says why)."""
    choice = os.environ.get(KERNEL_ENV, "elastiq")
    if choice not in ("elastiq", "torch"):
        raise ValueError(f"{KERNEL_ENV} must be 'elastiq' (the default) or 'torch'; got {choice!r}")
    return choice == "elastiq" and _built()


@functools.cache
def _built() -> bool:
    try:
        _build()
    except Exception as err:  # no compiler, no ninja, a failed build: the torch paths still run
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"elastiq: the CPU kernels could not be built ({reason}); using torch's ops, slower to decode",
              file=sys.stderr)
        return False
    return True


@functools.cache
def build_name() -> str:
    """The ops' build, named by their source, torch's version and the machine's architecture: what
    a remembered decode speed of the torch backend depends on (``runtime.fastest``)."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + platform.machine().encode())
    return f"elastiq_cpu_ops_{key.hexdigest()[:12]}"


def _build() -> None:
    """Compile (once per source, torch and machine) and load ``cpu_ops.cpp``."""
    from torch.utils import cpp_extension

    from ..paths import cache_dir

    name = build_name()
    build = cache_dir() / "kernels" / name
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform == "linux" else []
    if not (build / f"{name}.so").exists():
        print("elastiq: compiling the CPU kernels, once for this machine (about 10 s)", file=sys.stderr)
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(build), is_python_module=False,
                       extra_cflags=["-O3", "-ffp-contract=off", *openmp], extra_ldflags=openmp, verbose=False)
    torch.library.register_fake("elastiq::q4_matmul")(_q4_matmul_shape)
    torch.library.register_fake("elastiq::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("elastiq::rope_gather_")(lambda q, k, cos, sin, channels: None)


def _q4_matmul_shape(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero: int,
                     bias: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
                     out_index: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """The output ``q4_matmul`` gives, without computing it: what ``torch.compile`` traces."""
    n = codes.shape[0] if out_index is None else out_index.shape[0]
    return x.new_empty((*x.shape[:-1], n))

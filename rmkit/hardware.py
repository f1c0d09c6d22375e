"""Which precision this machine trains and scores fastest in, and why.

On a GPU, bf16. On a CPU it depends on the chip. With bf16 matmul instructions, AMX tiles
(`amx_bf16`: Intel Sapphire Rapids and later) or AVX-512 bf16 dot products (`avx512_bf16`: Intel
Cooper Lake, AMD Zen 4 and later), oneDNN runs bf16 matmuls 2-4x faster than fp32 (measured on an
AMD EPYC with avx512_bf16 and no AMX: 760-820 against 160-185 GFLOP/s, and training 1.8-2.2x faster in
single preliminary runs, docs/benchmarks.md). Without either, PyTorch emulates bf16 through fp32 and converts, which runs
slower than plain fp32 (0.9 against 82-120 GFLOP/s on an avx2-only EPYC). So `auto` reads the
CPU's flags (no timing probe: the choice must be the same on every rank and every resume).
`RMKIT_PRECISION=fp32|bf16` in the environment pins what `auto` means, for training, eval,
scoring and serving alike (e.g. fp32 rewards to compare exactly; the tests pin fp32 so that they
assert the same on every CPU).
"""

from __future__ import annotations

import os
from pathlib import Path

from rmkit.errors import RmkitError

CPUINFO = Path("/proc/cpuinfo")
ENV = "RMKIT_PRECISION"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo is not there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(requested: str, on_gpu: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """(precision, reason): `requested` unless it is "auto"."""
    if requested != "auto":
        return requested, "set in the recipe (launch.precision)"
    pinned = os.environ.get(ENV, "auto")
    if pinned != "auto":
        if pinned not in ("fp32", "bf16"):
            raise RmkitError(f"{pinned!r} is not a precision", where=ENV,
                             hint=f"set {ENV} to auto, fp32 or bf16, or unset it")
        return pinned, f"auto: {ENV}={pinned} in the environment"
    if on_gpu:
        return "bf16", "auto: GPU"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "bf16", "auto: CPU with AMX (amx_bf16): bf16 matmuls run faster than fp32"
    if "avx512_bf16" in flags:
        return "bf16", "auto: CPU with avx512_bf16 (no AMX): bf16 matmuls run faster than fp32"
    return "fp32", "auto: CPU without amx_bf16 or avx512_bf16: bf16 would be emulated, slower than fp32"

"""Which precision this machine trains and scores fastest in, and why.

On a GPU, bf16. On a CPU it depends on the chip: with AMX (Intel Sapphire Rapids and later,
`amx_bf16` in /proc/cpuinfo) bf16 matmuls run on the tile unit, about 3x the fp32 rate; without
it PyTorch emulates bf16 through fp32 and converts, about 3x slower than plain fp32. So `auto`
reads the CPU's flags (no probe: the choice must be the same on every rank and every resume).
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


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
    if on_gpu:
        return "bf16", "auto: GPU"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "bf16", "auto: CPU with AMX (amx_bf16): bf16 matmuls run about 3x faster than fp32"
    extra = " (it has avx512_bf16, but no AMX tiles)" if "avx512_bf16" in flags else ""
    return "fp32", f"auto: CPU without AMX{extra}: bf16 would run slower than fp32"

"""CPU training: glibc keeps freed memory for the next micro-batch instead of handing it back.

Every micro-batch frees and reallocates tensors of the same sizes (activations, gradients, the
embedding's 28M-element gradient for SmolLM2-135M). By default glibc serves each block over its
mmap threshold (at most 32 MB) with a fresh mapping, unmaps it on free and trims the heap's top,
so each new tensor page-faults on its first touch: in a bf16 SmolLM2-135M GRFT step on a 2-core
Xeon with AMX, zeroing the embedding gradient took 65 ms a micro-batch instead of 3, and page
faults were a quarter of the step's self CPU time (bench/throughput.py --profile). Serving every
block from the heap and never trimming it (what jemalloc or tcmalloc setups for CPU training
do, without a library to preload) costs a few percent more peak RSS. `RMKIT_MALLOC=system`
leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os

from rmkit.errors import RmkitError

ENV = "RMKIT_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MiB come from the heap
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only a top over 2 GiB


def allocator_choice() -> str:
    """`keep` (the default) or `system`, from the environment; checked before a launch."""
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system"):
        raise RmkitError(f"{choice!r} is not an allocator setting", where=ENV,
                         hint=f"set {ENV} to keep (the default) or system, or unset it")
    return choice


def keep_freed_memory() -> str:
    """Make this process's glibc malloc keep freed memory (heap up to 32 MiB, no trim); says what it did.

    mmap stays on above 32 MiB: with it off (M_MMAP_MAX=0), two-process gloo runs aborted (SIGABRT)
    when a thread arena could not grow."""
    if allocator_choice() == "system":
        return f"glibc malloc defaults ({ENV}=system)"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "the system allocator (not glibc: left as it is)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return "glibc malloc defaults (mallopt refused)"
    return "glibc malloc keeps freed memory for reuse (heap up to 32 MiB, no trim)"

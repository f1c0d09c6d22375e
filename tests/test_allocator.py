"""rmkit/allocator.py: on CPU, freed memory stays with the process for the next micro-batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmkit.allocator import ENV, allocator_choice, keep_freed_memory
from rmkit.errors import RmkitError

# RSS (MiB) after 8 tensors of 24 MiB (under glibc's 32 MiB mmap ceiling) are filled, then after they are freed
PROBE = """
import os, torch
from rmkit.allocator import keep_freed_memory
print(keep_freed_memory())
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 2**20
t = [torch.ones(6 * 2**20) for _ in range(8)]
full = rss()
del t
print(full, rss())
"""


def _probe(setting: str) -> tuple[str, int, int]:
    env = dict(os.environ, **{ENV: setting})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.splitlines()
    full, freed = map(int, out[-1].split())
    return out[-2], full, freed


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_freed_tensors_stay_mapped_with_keep_and_go_back_with_system() -> None:
    said, full, freed = _probe("keep")
    assert said == "glibc malloc keeps freed memory for reuse (heap up to 32 MiB, no trim)"
    assert full - freed < 16  # the 192 MiB stay with the process, to be reused without page faults
    said, full, freed = _probe("system")
    assert said == "glibc malloc defaults (RMKIT_MALLOC=system)"
    assert full - freed > 150  # glibc unmaps blocks this large on free


def test_a_bad_setting_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(RmkitError) as err:
        allocator_choice()
    assert str(err.value) == ("RMKIT_MALLOC: 'jemalloc' is not an allocator setting\n"
                              "  hint: set RMKIT_MALLOC to keep (the default) or system, or unset it")
    with pytest.raises(RmkitError):
        keep_freed_memory()
    monkeypatch.delenv(ENV)
    assert allocator_choice() == "keep"

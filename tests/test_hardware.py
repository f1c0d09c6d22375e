"""launch.precision: auto picks by the hardware, and says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmkit.hardware import cpu_flags, resolve_precision


def test_cpu_flags_reads_the_first_processor(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_precision_by_hardware() -> None:
    assert resolve_precision("auto", on_gpu=True) == ("bf16", "auto: GPU")
    p, why = resolve_precision("auto", on_gpu=False, flags={"avx2", "amx_bf16"})
    assert p == "bf16" and "AMX" in why
    p, why = resolve_precision("auto", on_gpu=False, flags={"avx2", "avx512_bf16"})
    assert p == "fp32" and why == "auto: CPU without AMX (it has avx512_bf16, but no AMX tiles): bf16 would run slower than fp32"
    assert resolve_precision("auto", on_gpu=False, flags={"avx2"})[0] == "fp32"
    assert resolve_precision("bf16", on_gpu=False, flags={"avx2"}) == ("bf16", "set in the recipe (launch.precision)")


def test_eval_chooses_like_training(monkeypatch) -> None:
    import torch

    import rmkit.hardware as hardware
    from rmkit.scorer import default_device

    if torch.cuda.is_available():
        pytest.skip("a GPU machine scores in bf16 on the GPU")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert default_device() == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert default_device() == (torch.device("cpu"), torch.float32)

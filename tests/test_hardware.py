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


def test_auto_precision_by_hardware(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RMKIT_PRECISION")  # the tests' fp32 pin (conftest.py) off: `auto` itself
    assert resolve_precision("auto", on_gpu=True) == ("bf16", "auto: GPU")
    assert resolve_precision("auto", on_gpu=False, flags={"avx2", "avx512_bf16", "amx_bf16"}) == (
        "bf16", "auto: CPU with AMX (amx_bf16): bf16 matmuls run faster than fp32")
    # AVX-512 bf16 without AMX (AMD Zen 4 and later, Intel Cooper Lake): bf16 is still the faster
    assert resolve_precision("auto", on_gpu=False, flags={"avx2", "avx512f", "avx512_bf16"}) == (
        "bf16", "auto: CPU with avx512_bf16 (no AMX): bf16 matmuls run faster than fp32")
    # avx512f alone has no bf16 dot product: emulated bf16 is the slower
    assert resolve_precision("auto", on_gpu=False, flags={"avx2", "avx512f"}) == (
        "fp32", "auto: CPU without amx_bf16 or avx512_bf16: bf16 would be emulated, slower than fp32")
    assert resolve_precision("auto", on_gpu=False, flags={"avx2"})[0] == "fp32"
    assert resolve_precision("auto", on_gpu=False, flags=set())[0] == "fp32"  # no /proc/cpuinfo
    assert resolve_precision("bf16", on_gpu=False, flags={"avx2"}) == ("bf16", "set in the recipe (launch.precision)")


def test_eval_chooses_like_training(monkeypatch) -> None:
    import torch

    import rmkit.hardware as hardware
    from rmkit.scorer import default_device

    if torch.cuda.is_available():
        pytest.skip("a GPU machine scores in bf16 on the GPU")
    monkeypatch.delenv("RMKIT_PRECISION")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert default_device() == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert default_device() == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    assert default_device() == (torch.device("cpu"), torch.float32)


def test_environment_pins_auto(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """RMKIT_PRECISION pins what `auto` means (train, eval, score and serve read the same rule); a
    recipe's explicit precision still wins; a value that is not a precision is refused by name."""
    import torch

    from rmkit.errors import RmkitError
    from rmkit.scorer import default_device

    monkeypatch.setenv("RMKIT_PRECISION", "bf16")
    assert resolve_precision("auto", on_gpu=False, flags={"avx2"}) == ("bf16", "auto: RMKIT_PRECISION=bf16 in the environment")
    assert resolve_precision("fp32", on_gpu=False, flags={"amx_bf16"}) == ("fp32", "set in the recipe (launch.precision)")
    if not torch.cuda.is_available():
        assert default_device() == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("RMKIT_PRECISION", "fp32")
    assert resolve_precision("auto", on_gpu=True) == ("fp32", "auto: RMKIT_PRECISION=fp32 in the environment")
    monkeypatch.setenv("RMKIT_PRECISION", "fp64")
    with pytest.raises(RmkitError) as e:
        resolve_precision("auto", on_gpu=False)
    assert e.value.render() == ("RMKIT_PRECISION: 'fp64' is not a precision\n"
                                "  hint: set RMKIT_PRECISION to auto, fp32 or bf16, or unset it")

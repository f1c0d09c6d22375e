"""Packaged resources: a wheel install ships the recipes and ZeRO configs and the CLI finds them.

The wheel test builds the wheel, installs it with --no-deps into a fresh virtual environment that
sees the installed dependencies (--system-site-packages), and runs that environment's `rmkit`
from a folder outside the repository. The fast tests check how recipe and ZeRO config names
resolve in this checkout (the repository folders), from any working folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rmkit.errors import RmkitError
from rmkit.recipe import DS_CONFIGS_DIR, RECIPES_DIR, resolve_ds_config_path, resolve_recipe_path
from rmkit.resources import PACKAGED_DIR, resource_dir

ROOT = Path(__file__).resolve().parent.parent
# What the build reads: the project files and the folders setup.py copies into rmkit/_resources.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "rmkit", "recipes", "ds_configs")


def test_checkout_uses_repository_folders() -> None:
    assert not PACKAGED_DIR.exists(), "rmkit/_resources is made by the wheel build and never committed"
    assert resource_dir("recipes") == RECIPES_DIR == ROOT / "recipes"
    assert resource_dir("ds_configs") == DS_CONFIGS_DIR == ROOT / "ds_configs"


def test_recipe_names_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("cpu/grft", "cpu/grft.yaml", "recipes/cpu/grft.yaml"):
        assert resolve_recipe_path(name) == RECIPES_DIR / "cpu" / "grft.yaml"
    assert resolve_recipe_path("grft") == RECIPES_DIR / "grft.yaml"
    local = tmp_path / "recipes" / "cpu" / "grft.yaml"  # a file where the user runs wins
    local.parent.mkdir(parents=True)
    local.write_text("stage: grft\n")
    assert resolve_recipe_path("recipes/cpu/grft.yaml") == Path("recipes/cpu/grft.yaml")
    with pytest.raises(RmkitError) as e:
        resolve_recipe_path("cpu/grf")
    assert "did you mean 'cpu/grft'?" in str(e.value.hint) and "recipes/cpu/crft.yaml" in str(e.value.hint)


def test_zero_config_names_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config_path("zero2") == DS_CONFIGS_DIR / "zero2.json"
    assert resolve_ds_config_path("ds_configs/zero2.json") == DS_CONFIGS_DIR / "zero2.json"
    with pytest.raises(RmkitError, match="no such DeepSpeed config"):
        resolve_ds_config_path("ds_configs/zero9.json")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.mark.wheel
def test_wheel_install_ships_recipes_and_zero_configs(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Build from a copy of the build inputs, so no build/ or egg-info is written into the repository
    # and files a build left there earlier cannot leak into this wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_resources"))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    quiet = ["-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", *quiet, "--no-build-isolation", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("rmkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("recipes/grft.yaml", "recipes/cpu/grft.yaml", "recipes/cpu/crft.yaml", "ds_configs/zero2.json",
              "ds_configs/zero3.json"):
        assert f"rmkit/_resources/{f}" in names, f"{f} is not in the wheel"

    # No pip in the venv: the base interpreter's pip is visible through --system-site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py, rmkit = venv / "bin" / "python", venv / "bin" / "rmkit"
    subprocess.run([str(py), "-m", "pip", "install", *quiet, str(wheel)], check=True, capture_output=True,
                   timeout=300)

    # Outside the repository and without PYTHONPATH, the venv's site-packages comes before the
    # editable install (its finder is appended to sys.meta_path); asserted, not assumed.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", CUDA_VISIBLE_DEVICES="", RMKIT_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    out = _run([str(py), "-c", "import rmkit, rmkit.recipe as r; print(rmkit.__file__); "
                "print(r.resolve_recipe_path('cpu/grft')); print(r.resolve_ds_config_path('zero2')); "
                "print(r.resolve_ds_config_path('ds_configs/zero2.json'))"], work, env)
    assert out.splitlines() == [str(site / "rmkit" / "__init__.py"),
                                str(site / "rmkit" / "_resources" / "recipes" / "cpu" / "grft.yaml"),
                                str(site / "rmkit" / "_resources" / "ds_configs" / "zero2.json"),
                                str(site / "rmkit" / "_resources" / "ds_configs" / "zero2.json")]

    out = _run([str(rmkit), "recipe", "validate", "grft", "cpu/grft", "recipes/cpu/crft.yaml"], work, env)
    assert out.splitlines() == ["ok grft (grft)", "ok cpu/grft (grft)", "ok recipes/cpu/crft.yaml (crft, domain business)"]

    # No --recipe: the packaged recipes/grft.yaml (paper settings, deepspeed: zero3) with a local model.
    out = _run([str(rmkit), "train", "grft", "--dry-run", "--set", f"model.path={tiny_model_dir}"], work, env)
    lines = out.splitlines()
    launcher = ("deepspeed --num_gpus 1 --num_nodes 1 --master_port 29500 --log_level warning --module "
                "rmkit.train.worker runs/grft")
    assert launcher in lines, out
    assert any(ln.startswith("resolved recipe (world size 1, gradient accumulation 16, precision ") for ln in lines), out
    for ln in ("  lr: 1.0e-06", "  warmup_steps: 100", "  deepspeed: zero3"):
        assert ln in lines, out
    assert not (work / "runs").exists()  # a dry run writes nothing

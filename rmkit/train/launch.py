"""Recipe -> run directory -> the `deepspeed` launcher command, and starting it.

The launcher is a parameter (`runner`), so tests can assert the argv without starting anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from rmkit.checkpoint import META_FILE, check_weights, list_checkpoints
from rmkit.console import console
from rmkit.errors import RmkitError
from rmkit.recipe import Recipe, dump_recipe
from rmkit.train.rundir import RunPlan, plan_run, write_run_dir

LOCK_FILE = ".lock"
SHM_DIR = Path("/dev/shm")


def release_shm(port: int | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves behind.

    Its shm comm (ops/csrc/cpu/comm/shm.cpp) creates `deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
    (67 MB per rank) and never unlinks it, on success or failure; /dev/shm is RAM, so a few hundred
    runs fill memory and later runs die of the OOM killer. With `port`: that launch's buffers
    (the port is unique to it). Without: every local launch's whose port nobody listens on any
    more (a run killed with its launcher, so no one cleaned up after it)."""
    removed = []
    for f in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        parts = f.name.rsplit("_", 3)  # [prefix_uid, addr, port, rank]
        if len(parts) != 4 or not parts[2].isdigit():
            continue
        if port is not None and int(parts[2]) != port:
            continue
        if port is None and (parts[1] not in ("127.0.0.1", "localhost") or _listening(int(parts[2]))):
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
    return removed


def _listening(port: int) -> bool:
    """Rank 0's TCP store listens on the master port for as long as a run lives."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(recipe: Recipe, plan: RunPlan, resume: bool, port: int | None = None) -> list[str]:
    """The exact `deepspeed` argv: one process per GPU (or per requested CPU process)."""
    launch = recipe.launch
    procs = plan.world_size // launch.nodes
    cmd = ["deepspeed", "--num_gpus", str(procs), "--num_nodes", str(launch.nodes)]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile]
    cmd += ["--master_port", str(launch.master_port or port or free_port()), "--log_level", "warning"]
    cmd += ["--module", "rmkit.train.worker", str(plan.run_dir)]
    if resume:
        cmd.append("--resume")
    return cmd


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One run per directory: a second `rmkit train` on the same folder refuses to start."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise RmkitError(f"{run_dir} is in use by a running training (pid {holder})",
                             hint="wait for it to finish, or set train.output_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def _default_runner(cmd: list[str]) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "DS_ACCELERATOR" not in env:
        from rmkit.train.rundir import detect_gpus

        if detect_gpus() == 0:
            env["DS_ACCELERATOR"] = "cpu"  # say it, so DeepSpeed does not warn that it guessed
    bindir = Path(sys.executable).parent
    if (bindir / "deepspeed").exists():
        cmd = [str(bindir / "deepspeed"), *cmd[1:]]
    release_shm()  # what killed runs left
    try:
        return subprocess.call(cmd, env=env)
    finally:
        if "--master_port" in cmd:
            release_shm(int(cmd[cmd.index("--master_port") + 1]))


def train(recipe: Recipe, resume: bool = False, dry_run: bool = False,
          runner: Callable[[list[str]], int] = _default_runner) -> int:
    """Validate everything, write the run directory, start the launcher; returns its exit code."""
    plan = plan_run(recipe)
    check_weights(plan.model_path, recipe.model.trust_remote_code)  # before any process starts
    if dry_run:
        cmd = launcher_command(recipe, plan, resume, port=recipe.launch.master_port or 29500)
        console.print("[bold]launcher command[/]")
        console.print(shlex.join(cmd), soft_wrap=True, markup=False)
        console.print(f"[bold]resolved recipe[/] (world size {plan.world_size}, gradient accumulation "
                      f"{plan.grad_accum}, precision {plan.precision}: {plan.precision_reason})", soft_wrap=True)
        console.print(dump_recipe(recipe), markup=False)
        return 0
    run_dir = plan.run_dir
    if resume and not (run_dir / "run.json").exists():  # checked before the lock creates the folder
        raise RmkitError(f"nothing to resume in {run_dir}", hint="start it without --resume")
    existed = set(os.listdir(run_dir)) if run_dir.is_dir() else None
    with run_lock(run_dir):
        done = (run_dir / "final" / META_FILE).exists()
        if resume:
            if done:
                console.print(f"{run_dir} already finished; final model in {run_dir / 'final'}")
                return 0
            _check_same_recipe(recipe, run_dir)
        else:
            if list_checkpoints(run_dir) or done:
                raise RmkitError(f"{run_dir} already holds a run",
                                 hint="continue it with --resume, or set train.output_dir to a new folder "
                                      "(--set train.output_dir=...)")
            try:
                manifest = write_run_dir(recipe, plan)
            except BaseException:
                _remove_new(run_dir, existed)  # a bad data file leaves no half-written run behind
                raise
            _print_plan(recipe, plan, manifest)
        cmd = launcher_command(recipe, plan, resume)
        console.print("[dim]" + shlex.join(cmd) + "[/]", soft_wrap=True)
        code = runner(cmd)
    return 2 if code == 2 else code


def _remove_new(run_dir: Path, existed: set[str] | None) -> None:
    """Delete what this command added to `run_dir` (the whole folder if it made it)."""
    if existed is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in set(os.listdir(run_dir)) - existed:
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _check_same_recipe(recipe: Recipe, run_dir: Path) -> None:
    import json

    from rmkit.io import sha256_text

    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RmkitError(f"cannot read {run_dir / 'run.json'} ({e})",
                         hint="the run folder is damaged; start a new run in another train.output_dir") from None
    if sha256_text(dump_recipe(recipe)) != info.get("recipe_sha256"):
        raise RmkitError(f"the recipe differs from the one {run_dir} was started with",
                         hint=f"resume with the same recipe and --set values (see {run_dir / 'recipe.yaml'})")


def _print_plan(recipe: Recipe, plan: RunPlan, manifest: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{recipe.stage} data", show_lines=False)
    for col in ("source", "format", "split", "records", "pairs", "taken", "dropped"):
        t.add_column(col)
    for s in manifest["train"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-"
        t.add_row(Path(s["path"]).name, s["format"], s["split"], str(s["records"]), str(s["pairs"]), str(s["taken"]), dropped)
    for name, s in manifest["eval"].items():
        t.add_row(f"eval {name}: {Path(s['path']).name}", s["format"], s["split"], str(s["records"]), str(s["pairs"]), "-",
                  ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-")
    console.print(t)
    console.print(f"{manifest['train_records']} train records ({manifest['train_pairs']} pairs), world size "
                  f"{plan.world_size}, gradient accumulation {plan.grad_accum}, precision {plan.precision} "
                  f"({plan.precision_reason})", markup=False)

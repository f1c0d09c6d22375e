"""The framework seam: the only module that imports deepspeed.

The training loop talks to an `Engine`: forward, backward, step, a few collectives, gathered
weights for saving, and the optimizer/scheduler state for resuming. Two engines implement it:

- `DeepSpeedEngine`: DeepSpeed's engine (ZeRO 0-3, offload, bf16/fp16), one per rank, started by
  the `deepspeed` launcher (or in this process with world size 1 when no launcher set the
  environment, for benches that time DeepSpeed's own path);
- `LocalEngine`: one process, plain torch AdamW with the same optimizer settings, gradient
  accumulation, clipping and skip-on-overflow rule, for tests and benches that need a real
  training step without a process group.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch

from rmkit.errors import RmkitError

# How long ranks other than 0 wait before raising an error every rank raises: the launcher stops
# all ranks as soon as the first one exits, so rank 0 must be first to print the message.
STOP_GRACE_S = 10.0
LOCAL_STATE_FILE = "local_engine.pt"

LrLambda = Callable[[int], float]


class Engine:
    """What the loop needs from a framework; subclasses set the attributes in their __init__."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    module: torch.nn.Module
    global_steps: int = 0
    skipped_steps: int = 0

    def __call__(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # ---- collectives (identity in one process) ----------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def stop(self, problem: str, hint: str) -> NoReturn:
        """Raise an error every rank raises: rank 0 at once (worker.py prints it, exit 2), the
        others after STOP_GRACE_S, by which time the launcher has stopped them on rank 0's exit."""
        if self.rank != 0:
            time.sleep(STOP_GRACE_S)
        raise RmkitError(problem, hint=hint)

    # ---- weights ----------------------------------------------------------------------------
    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's values of a parameter (its ZeRO-3 partition, or the whole tensor)."""
        return p.data

    @contextlib.contextmanager
    def gathered(self, p: torch.nn.Parameter) -> Iterator[None]:
        """The whole parameter readable on every rank inside the block."""
        yield

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Full weights (and buffers) on rank 0, copied to CPU one tensor at a time; None elsewhere.
        trainable_only: just the parameters that train (LoRA + head), no buffers."""
        sd: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if trainable_only and not p.requires_grad:
                continue
            with self.gathered(p):
                if self.rank == 0:
                    sd[name] = p.data.detach().to("cpu", copy=True)
        if not trainable_only and self.rank == 0:
            for name, b in self.module.named_buffers():
                sd[name] = b.detach().to("cpu", copy=True)
        return sd if self.rank == 0 else None

    # ---- resumable state ----------------------------------------------------------------------
    def save_state(self, folder: Path, client_state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_state(self, folder: Path) -> dict[str, Any]:
        """Restore what save_state wrote; returns its client_state."""
        raise NotImplementedError


def init_process(seed: int) -> tuple[int, int, torch.device]:
    """Start this rank's process group (DeepSpeed's, from the launcher's environment; a group of
    one when no launcher set it), pick the device and seed every RNG with seed + rank."""
    import random

    import deepspeed
    import numpy as np
    import torch.distributed as dist

    if "RANK" not in os.environ:  # started outside the launcher: a world of one, on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return rank, world, device


def _device(local_rank: int, local_world: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))  # the cores, shared out
    return torch.device("cpu")


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def save_rng(path: Path) -> None:
    """This rank's torch (and CUDA) RNG state as safetensors, written atomically."""
    from safetensors.torch import save

    from rmkit.io import atomic_file

    with atomic_file(path, "wb") as f:
        f.write(save(_rng_state()))


def load_rng(path: Path) -> None:
    from safetensors.torch import load_file

    if path.exists():
        _set_rng_state(load_file(str(path)))


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine for one rank of a launched job."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], lr_lambda: LrLambda,
                 rank: int, world: int, device: torch.device) -> None:
        import deepspeed

        def sched(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        params = [p for p in model.parameters() if p.requires_grad]
        self.rank, self.world, self.device, self.module = rank, world, device, model
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=config, lr_scheduler=sched)
        _guard_plain_optimizer(self.ds.optimizer, self.all_reduce)

    def __call__(self, **inputs: Any) -> Any:
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    @property
    def global_steps(self) -> int:  # type: ignore[override]
        return int(self.ds.global_steps)

    @property
    def skipped_steps(self) -> int:  # type: ignore[override]
        return int(getattr(self.ds, "skipped_steps", 0))

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data

    @contextlib.contextmanager
    def gathered(self, p: torch.nn.Parameter) -> Iterator[None]:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            yield

    def save_state(self, folder: Path, client_state: dict[str, Any]) -> None:
        import errno
        import shutil

        try:
            self.ds.save_checkpoint(str(folder), tag="ds", client_state=client_state, save_latest=False)
        except RuntimeError as e:  # torch.save reports a full disk as an opaque RuntimeError
            root: BaseException = e
            while root.__context__ is not None:
                root = root.__context__
            full = shutil.disk_usage(folder.parent).free < 1 << 20  # what the failed write left
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, f"{os.strerror(code)} (DeepSpeed's torch.save: {type(root).__name__}: {root})",
                          str(folder)) from e
        save_rng(folder / f"rng-rank{self.rank}.safetensors")

    def load_state(self, folder: Path) -> dict[str, Any]:
        load_path, client = self.ds.load_checkpoint(str(folder), tag="ds", load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RmkitError(f"could not load the DeepSpeed state in {folder}",
                             hint="the checkpoint is damaged; delete it to resume from the one before")
        load_rng(folder / f"rng-rank{self.rank}.safetensors")
        return dict(client or {})


def _guard_plain_optimizer(opt: Any, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """ZeRO-1/2/3 drop an update whose gradient norm is not finite (all ranks agree through their
    all-reduce). ZeRO-0 hands the plain torch optimizer over unguarded: wrap its step so non-finite
    gradients drop the update, and report it as `overflow`, so DeepSpeed counts the skip and holds
    the LR schedule exactly as its ZeRO optimizers do."""
    if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "overflow"):
        return
    inner = opt.step

    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                  for group in opt.param_groups for p in group["params"])
        opt.overflow = all_reduce(torch.tensor([float(bad)])).item() > 0
        if not opt.overflow:
            return inner(*args, **kwargs)
        opt.zero_grad(set_to_none=True)
        return None

    opt.overflow = False
    opt.step = guarded_step


class LocalEngine(Engine):
    """One process, no process group: torch AdamW configured from the same DeepSpeed config
    (optimizer params, gradient accumulation, clipping), fp32 weights with bf16/fp16 autocast.
    Like DeepSpeed, an update whose gradients are not finite is dropped (counted in
    skipped_steps) and the LR schedule does not advance for it."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], lr_lambda: LrLambda,
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.module = model.to(self.device)
        opt = dict(config.get("optimizer", {}).get("params", {}))
        opt.pop("torch_adam", None)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=opt.get("lr", 1e-5), betas=tuple(opt.get("betas", (0.9, 0.999))),
                                           eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.0),
                                           fused=bool(opt.get("fused", False)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.accum = int(config.get("gradient_accumulation_steps", 1))
        self.clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        self.autocast = (torch.bfloat16 if config.get("bf16", {}).get("enabled")
                         else torch.float16 if config.get("fp16", {}).get("enabled") else None)
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0

    def __call__(self, **inputs: Any) -> Any:
        if self.autocast is None:
            return self.module(**inputs)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # DeepSpeed scales by the accumulation steps the same way

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.clip)
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_state(self, folder: Path, client_state: dict[str, Any]) -> None:
        from rmkit.io import atomic_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "client": client_state,
                 "counters": [self.micro_steps, self.global_steps, self.skipped_steps]}
        with atomic_file(folder / LOCAL_STATE_FILE, "wb") as f:
            torch.save(state, f)
        save_rng(folder / "rng-rank0.safetensors")

    def load_state(self, folder: Path) -> dict[str, Any]:
        path = folder / LOCAL_STATE_FILE
        if not path.is_file():
            raise RmkitError(f"{folder} holds no local-engine state ({LOCAL_STATE_FILE})",
                             hint="resume with the engine that wrote the checkpoint")
        state = torch.load(path, map_location=self.device, weights_only=True)  # tensors and numbers only
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps, self.skipped_steps = (int(x) for x in state["counters"])
        load_rng(folder / "rng-rank0.safetensors")
        return dict(state["client"])

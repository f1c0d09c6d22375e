"""The training loop on a DeepSpeed engine: ranking + imitation (GRFT/CRFT) or LM loss (BLT),
metrics, periodic eval, atomic checkpoints and exact resume."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml

from rmkit import __version__
from rmkit.checkpoint import (META_FILE, finalize, list_checkpoints, nonfinite_names, prune, read_meta,
                              step_dir)
from rmkit.console import print0
from rmkit.data.collate import Batch, collate, encode_record, packing_pays
from rmkit.data.records import read_records
from rmkit.errors import RmkitError
from rmkit.io import TMP_PREFIX, atomic_file, atomic_write_json, free_space, write_error
from rmkit.loss import combine, imitation_loss, pair_accuracy, ranking_loss
from rmkit.recipe import Recipe
from rmkit.score import SetResult, score_shard, tally
from rmkit.train.faults import fault_at, maybe_die, maybe_enospc
from rmkit.train.schedule import lr_lambda, micro_batches, step_records, total_steps


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# How long ranks other than 0 wait before raising an error every rank raises: the launcher stops
# all ranks as soon as the first one exits, so rank 0 must be first to print the message.
STOP_GRACE_S = 10.0


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def micro_batch_loss(model: Any, batch: Batch, recipe: Recipe, with_lm: bool, device: torch.device,
                     lm_min_chunks: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """One micro-batch's forward and loss in either layout (one row per response, or packed
    with a shared prompt): rewards come back one per response in the same order, so the
    ranking pairs index them alike. Returns (loss, ranking term, imitation term, output)."""
    out = model(**batch.model_inputs(device, with_lm=with_lm), lm_chunk_size=recipe.loss.lm_chunk_size,
                lm_min_chunks=lm_min_chunks)
    im_l = imitation_loss(out.lm_loss) if with_lm else torch.zeros((), device=device)
    if recipe.stage == "blt":
        return im_l, torch.zeros((), device=device), im_l, out
    rank_l = ranking_loss(out.rewards.float(), batch.better.to(device), batch.worse.to(device), recipe.loss.margin)
    loss = combine(rank_l, im_l, recipe.loss.ranking_weight, recipe.loss.imitation_weight)
    return loss, rank_l, im_l, out


class Runner:
    """Holds everything one rank needs; the methods are the phases of a run."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        import deepspeed

        self.run_dir = run_dir
        self.recipe = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
        self.info = json.loads((run_dir / "run.json").read_text())
        self.ds_config = json.loads((run_dir / "ds_config.json").read_text())
        self.resume = resume
        deepspeed.init_distributed()
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.on_gpu = torch.cuda.is_available()
        if self.on_gpu:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        self.stage = self.recipe.stage
        seed = self.recipe.train.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)

    # ---- setup --------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed
        from transformers import AutoTokenizer

        from rmkit.model import RewardModel

        r = self.recipe
        model_path = Path(self.info["model_path"])
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=r.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.info["precision"], torch.float32)
        self.model = RewardModel.from_pretrained(model_path, pooling=r.model.pooling, dtype=torch.float32,
                                                 head_seed=r.model.head_seed,
                                                 trust_remote_code=r.model.trust_remote_code)
        if r.model.lora is not None:  # LoRA on the decoder; base frozen, score trained (rmkit/lora.py)
            from rmkit.lora import apply_lora

            if self.stage == "blt":
                raise RmkitError("model.lora applies to grft/crft; blt trains the whole LM",
                                 where="model.lora", hint="remove model.lora from the blt recipe")
            apply_lora(self.model, r.model.lora, seed=r.train.seed)
        if r.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()  # non-reentrant (transformers' default)
        self.append_eos = r.model.pooling == "eos"
        # data: encode once, lengths for grouping
        train = read_records(self.run_dir / "data" / "train.jsonl")
        self.train_enc = [self._encode(x) for x in train]
        self.lengths = [max(len(e.prompt_ids) + len(resp) for resp in e.response_ids) for e in self.train_enc]
        prompt_group: dict[tuple[int, ...], int] = {}
        self.groups = [prompt_group.setdefault(tuple(e.prompt_ids), len(prompt_group)) for e in self.train_enc]
        self.evals: dict[str, tuple[list[Any], list[list[int]]]] = {}
        for name in r.data.eval:
            recs = read_records(self.run_dir / "data" / f"eval-{name}.jsonl")
            self.evals[name] = ([self._encode(x) for x in recs], [[len(s) for s in x.responses] for x in recs])
        n = len(self.train_enc)
        if n < r.train.global_batch:
            raise RmkitError(f"{n} training records is fewer than one global batch ({r.train.global_batch})",
                             where="train.global_batch", hint="lower train.global_batch or add data")
        self.total = total_steps(n, r.train.global_batch, r.train.epochs, r.train.max_steps)
        t = r.train
        optimizer_lambda = lambda s: lr_lambda(s, self.total, t.warmup_steps, t.schedule, t.min_lr_ratio)  # noqa: E731

        def sched(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, optimizer_lambda)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config, lr_scheduler=sched)
        self.dtype = dtype

    def _encode(self, rec: Any) -> Any:
        d = self.recipe.data
        return encode_record(rec, self.tokenizer, d.max_length, d.truncation_side, self.append_eos)

    # ---- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        r = self.recipe
        ids = step_records(step, len(self.train_enc), r.train.global_batch, r.train.seed, self.groups)
        micros = micro_batches(ids, self._group_lengths(), r.train.micro_batch, self.world, self.rank,
                               self.groups)
        blt = self.stage == "blt"
        lm_target = "whole" if blt else (r.loss.imitation_target if r.loss.imitation_weight > 0 else "none")
        sums = torch.zeros(6, dtype=torch.float64)  # rank_loss, im_loss, correct, pairs, tokens, truncated
        for mb in micros:
            encs = [self.train_enc[i] for i in mb]
            pack = r.data.prefix_sharing and not blt and packing_pays(encs, self._attention_scale())
            batch = collate(encs, pad_id=self.tokenizer.pad_token_id, padding_side=r.data.padding_side,
                            lm_target=lm_target, rows="preferred" if blt else "all", pack=pack,
                            reduction="token" if blt else r.loss.imitation_reduction)
            min_chunks = 0
            if lm_target != "none" and self.world > 1:
                # ZeRO-3 gathers lm_head collectively: every rank must run the same number of chunks
                import torch.distributed as dist

                chunks = torch.tensor([math.ceil(batch.n_lm_targets / r.loss.lm_chunk_size)], dtype=torch.long)
                dist.all_reduce(chunks, op=dist.ReduceOp.MAX)
                min_chunks = int(chunks.item())
            loss, rank_l, im_l, out = micro_batch_loss(self.engine, batch, r, lm_target != "none", self.device,
                                                       min_chunks)
            loss = self.guard_loss(loss, step)
            finite = torch.tensor([float(torch.isfinite(loss.detach()).item())])
            if _all_reduce(finite).item() < self.world:
                self.nonfinite(step)
            self.engine.backward(loss)
            self.engine.step()
            c, p = pair_accuracy(out.rewards.detach().float(), batch.better.to(self.device), batch.worse.to(self.device)) if not blt else (0, 0)
            sums += torch.tensor([rank_l.item(), im_l.item(), c, p, batch.n_tokens, batch.n_truncated], dtype=torch.float64)
        _all_reduce(sums)
        k = max(1, len(micros) * self.world)
        rank_mean, im_mean = sums[0].item() / k, sums[1].item() / k
        total = im_mean if blt else r.loss.ranking_weight * rank_mean + r.loss.imitation_weight * im_mean
        return {"loss": total, "loss_ranking": rank_mean, "loss_imitation": im_mean,
                "accuracy": sums[2].item() / max(1.0, sums[3].item()), "pairs": int(sums[3].item()),
                "tokens": int(sums[4].item()), "truncated": int(sums[5].item()),
                "lr": self.scheduler.get_last_lr()[0]}

    def _group_lengths(self) -> list[int]:
        """What micro-batches are grouped by: a record's packed row length ([prompt][resp_1]...)
        when prefix sharing may apply, else its longest row; computed once."""
        if not self.recipe.data.prefix_sharing or self.stage == "blt":
            return self.lengths
        if getattr(self, "_packed_lengths", None) is None:
            self._packed_lengths = [len(e.prompt_ids) + sum(len(x) for x in e.response_ids) for e in self.train_enc]
        return self._packed_lengths

    def _attention_scale(self) -> float:
        return float(getattr(self.model, "attention_scale", 4096.0))

    # ---- non-finite loss, gradients or weights ----------------------------------------------------
    def guard_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Called on every micro-batch's loss before the finiteness check. On a step's first
        micro-batch it settles the previous step (did DeepSpeed drop its update?) and guards a plain
        ZeRO-0 optimizer; `RMKIT_FAULT=nan:N` makes rank 0's loss NaN in step N (tests)."""
        if getattr(self, "_guard_step", None) == step:
            return loss
        self._guard_step = step
        self.confirm_skips(step)
        self._guard_plain_optimizer()
        if self.rank == 0 and fault_at("nan", step + 1):
            return loss * float("nan")
        return loss

    def nonfinite(self, step: int) -> None:
        """Some rank's loss is not finite in step `step` (0-based); every rank calls this together
        (the check is all-reduced). stop: raise, naming the step and the last good checkpoint.
        skip: go on; the NaN gradients make DeepSpeed's ZeRO optimizer (or the ZeRO-0 guard below)
        drop the whole update on every rank, and `confirm_skips` logs it."""
        if self.recipe.train.on_nonfinite == "skip":
            self._nonfinite_loss = getattr(self, "_nonfinite_loss", set()) | {step + 1}
            return
        self._stop(f"non-finite loss at step {step + 1}; stopped before writing any weights",
                   hint=f"last good checkpoint: {self._last_good()}. Lower train.lr, check the data, or use fp32 "
                        "(launch.precision: fp32); train.on_nonfinite: skip skips such steps instead")

    def confirm_skips(self, done: int) -> None:
        """Account for the update of step `done` (1-based, the last completed one): DeepSpeed counts
        updates it dropped for non-finite gradients in `engine.skipped_steps`. skip: log the step in
        metrics.jsonl; stop: a dropped update means non-finite gradients, so stop."""
        skipped = int(getattr(self.engine, "skipped_steps", 0))
        seen = getattr(self, "_skips_seen", None)
        self._skips_seen = skipped
        nan_loss = done in getattr(self, "_nonfinite_loss", set())
        if seen is None or done < 1 or (skipped == seen and not nan_loss):
            return
        if nan_loss:
            self._nonfinite_loss.discard(done)  # settled: reported once
        if skipped == seen:  # a NaN loss whose gradients came out finite: DeepSpeed applied them
            self._log_skip(done, False, "non-finite loss, finite gradients: update applied")
            return
        if self.recipe.train.on_nonfinite != "skip":
            self._stop(f"non-finite gradients at step {done}; DeepSpeed dropped that update, so the weights are "
                       "unchanged; stopped before writing any weights",
                       hint=f"last good checkpoint: {self._last_good()}. Lower train.lr or train.grad_clip, check "
                            "the data; train.on_nonfinite: skip skips such steps instead")
        self._log_skip(done, True, "non-finite loss" if nan_loss else "non-finite gradients")

    def _log_skip(self, done: int, skipped: bool, reason: str) -> None:
        print0(f"[yellow]step {done}: {reason}{' (update skipped)' if skipped else ''}[/]")
        if self.rank == 0:  # its own line, appended after the step's row (Progress flushes each row)
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "skipped": skipped, "reason": reason}) + "\n")
            except OSError as e:
                raise write_error(path, e) from None

    def _guard_plain_optimizer(self) -> None:
        """ZeRO-1/2/3 drop an update whose gradient norm is not finite (all ranks agree through
        their all-reduce). ZeRO-0 hands the plain torch optimizer over unguarded: wrap its step so
        non-finite gradients (identical on all ranks after DeepSpeed's all-reduce; the flag is
        all-reduced anyway) drop the update, and report it as `overflow`, so DeepSpeed counts the
        skip and holds the LR schedule exactly as its ZeRO optimizers do."""
        if getattr(self, "_opt_guarded", False):
            return
        self._opt_guarded = True
        opt = self.engine.optimizer
        if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "overflow"):
            return
        inner = opt.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                      for group in opt.param_groups for p in group["params"])
            opt.overflow = _all_reduce(torch.tensor([float(bad)])).item() > 0
            if not opt.overflow:
                return inner(*args, **kwargs)
            opt.zero_grad(set_to_none=True)
            return None

        opt.overflow = False
        opt.step = guarded_step

    def _last_good(self) -> str:
        last = list_checkpoints(self.out_dir)
        return str(last[-1][1]) if last else "none yet"

    def _stop(self, problem: str, hint: str) -> NoReturn:
        """Raise an error every rank raises: rank 0 at once (worker.py prints it, exit 2), the others
        after STOP_GRACE_S, by which time the launcher has stopped them on rank 0's exit."""
        if self.rank != 0:
            time.sleep(STOP_GRACE_S)
        raise RmkitError(problem, hint=hint)

    # ---- eval ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        self.engine.eval()
        results = {}
        bs = max(1, self.recipe.train.micro_batch)
        for name, (enc, char_lens) in self.evals.items():
            res = SetResult()
            scored = score_shard(self.engine, enc, bs, self.tokenizer.pad_token_id,
                                 self.recipe.data.padding_side, self.rank, self.world, self.device,
                                 prefix_sharing=self.recipe.data.prefix_sharing)
            for i, rewards in scored:
                tally(res, enc[i], rewards, char_lens[i])
            maybe_die("eval", self.engine.global_steps)
            total = _all_reduce(res.as_tensor())
            results[name] = SetResult.from_tensor(total).summary()
        self.engine.train()
        return results

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return self.run_dir

    def meta(self, step: int) -> dict[str, Any]:
        r = self.recipe
        meta = {
            "stage": r.stage, "domain": r.domain, "step": step, "total_steps": self.total,
            "kind": "causal" if r.stage == "blt" else "reward",
            "parent": self.info.get("parent"), "base_model": self.info["model_path"],
            "recipe_sha256": self.info["recipe_sha256"], "data_manifest_sha256": self.info["data_manifest_sha256"],
            "rmkit_version": __version__, "git_commit": self.info.get("git_commit"),
            "pooling": r.model.pooling,
            "encoding": {"split": "prompt+response", "max_length": r.data.max_length,
                         "truncation_side": r.data.truncation_side, "padding_side": r.data.padding_side,
                         "append_eos": self.append_eos, "template": r.data.template},
        }
        if r.model.lora is not None:  # an adapter checkpoint names its base (path + fingerprint)
            from rmkit.lora import adapter_meta, base_fingerprint, count_parameters

            if not hasattr(self, "_base_fp"):
                self._base_fp = base_fingerprint(Path(self.info["model_path"]))
            meta.update(adapter_meta(r.model.lora, Path(self.info["model_path"]), self._base_fp,
                                     *count_parameters(self.model)))
        return meta

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Gathered full weights on rank 0 (ZeRO-3 partitions are gathered one tensor at a time).
        trainable_only: just the parameters that train (LoRA + head), no buffers."""
        import deepspeed

        zero3 = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        sd: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if trainable_only and not p.requires_grad:
                continue
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        sd[name] = p.data.detach().to("cpu", copy=True)
            elif self.rank == 0:
                sd[name] = p.data.detach().to("cpu", copy=True)
        for name, b in self.model.named_buffers():
            if self.rank == 0 and not trainable_only:
                sd[name] = b.detach().to("cpu", copy=True)
        return sd if self.rank == 0 else None

    def write_fingerprint(self) -> None:
        """Every rank hashes the full weights it sees (gathered under ZeRO-3): ranks must agree."""
        import hashlib

        import deepspeed

        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters(), key=lambda x: x[0]):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
                h.update(name.encode())
                h.update(p.data.detach().float().cpu().numpy().tobytes())
        (self.run_dir / f"fingerprint-rank{self.rank}.txt").write_text(h.hexdigest())

    def write_model(self, folder: Path) -> None:
        if self.recipe.model.lora is not None:  # adapter checkpoint: LoRA weights + head only
            from rmkit.lora import write_adapter

            sd = self.full_state_dict(trainable_only=True)
            if self.rank == 0:
                write_adapter(folder, sd, self.recipe.model.lora, Path(self.info["model_path"]),
                              self.model.base_prefix, self.tokenizer)
                (folder / "rmkit_recipe.yaml").write_text((self.run_dir / "recipe.yaml").read_text())
            return
        sd = self.full_state_dict()
        if self.rank == 0:
            kind = "causal" if self.stage == "blt" else "reward"
            self.model.save_pretrained(folder, kind=kind, tokenizer=self.tokenizer, state_dict=sd)
            (folder / "rmkit_recipe.yaml").write_text((self.run_dir / "recipe.yaml").read_text())

    def save(self, step: int, final: bool = False) -> None:
        """All ranks write into a temporary folder; rank 0 writes meta.json last and renames.

        First every rank checks its weights are finite (none ever reaches a checkpoint). A write
        that fails on any rank (full disk, read-only folder) removes the temporary folder and stops
        every rank with the folder, the reason and the free space; earlier checkpoints are untouched.
        The ranks settle each phase with an all-reduce of their failures, so none waits forever.
        """
        self.confirm_skips(step)
        dest = self.run_dir / "final" if final else step_dir(self.run_dir, step)
        tmp = dest.with_name(TMP_PREFIX + dest.name)
        self._check_finite_weights(step, dest)
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = e
        self._settle(failure, dest, tmp)
        try:
            if not final:
                try:
                    self.engine.save_checkpoint(str(tmp / "state"), tag="ds", client_state={"rmkit_step": step},
                                                save_latest=False)
                except RuntimeError as e:  # torch.save reports a full disk as an opaque RuntimeError
                    root = e
                    while root.__context__ is not None:
                        root = root.__context__
                    full = shutil.disk_usage(tmp.parent).free < 1 << 20  # what the failed write left
                    code = errno.ENOSPC if full else errno.EIO
                    raise OSError(code, f"{os.strerror(code)} (DeepSpeed's torch.save: {type(root).__name__}: "
                                        f"{root})", str(tmp / "state")) from e
                self._save_rng(tmp / "state" / f"rng-rank{self.rank}.safetensors")
            self.write_model(tmp)
            if self.rank == 0:
                maybe_enospc(step, str(tmp / "model.safetensors"))
            maybe_die("save", step)
        except (OSError, RmkitError) as e:
            failure = e
        self._settle(failure, dest, tmp)
        if self.rank == 0:
            try:
                finalize(tmp, dest, self.meta(step))
                if not final:
                    prune(self.run_dir, self.recipe.train.keep_last)
            except (OSError, RmkitError) as e:
                failure = e
        self._settle(failure, dest, tmp)

    def _save_rng(self, path: Path) -> None:
        from safetensors.torch import save

        rng = {"torch": torch.get_rng_state()}
        if self.on_gpu:
            rng["cuda"] = torch.cuda.get_rng_state()
        with atomic_file(path, "wb") as f:
            f.write(save(rng))

    def _check_finite_weights(self, step: int, dest: Path) -> None:
        """Every rank checks the weights it holds (its ZeRO-3 partition); all-reduced."""
        params = list(self.model.named_parameters())
        if self.rank == 0 and fault_at("nanweights", step):
            with torch.no_grad():
                _local(next(p for _, p in params if p.requires_grad and _local(p).numel())).view(-1)[0] = math.nan
        count, names = nonfinite_names((n, _local(p)) for n, p in params)
        total = int(_all_reduce(torch.tensor([float(count)])).item())
        if total:
            self._stop(f"refusing to write {dest}: {total} weight tensor(s) hold NaN or infinity at step {step}"
                       + (f" ({', '.join(names)})" if names else ""),
                       hint=f"last good checkpoint: {self._last_good()}. Lower train.lr, check the data, or set "
                            "train.on_nonfinite: skip")

    def _settle(self, failure: BaseException | None, dest: Path, tmp: Path) -> None:
        """The ranks' barrier after each save phase: all-reduce who failed; on any failure remove
        the temporary folder and stop on every rank."""
        flags = torch.zeros(self.world)
        flags[self.rank] = float(failure is not None)
        flags = _all_reduce(flags)
        if not flags.any():
            return
        if failure is not None:
            reason = (f"{failure.strerror} ({failure.filename})" if isinstance(failure, OSError) and failure.strerror
                      else failure.problem if isinstance(failure, RmkitError) else str(failure))
        else:
            reason = f"rank(s) {', '.join(str(i) for i in flags.nonzero().flatten().tolist())} failed to write their part"
        free = free_space(dest.parent)  # measured before the unfinished folder is removed
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        elif failure is not None:  # only rank 0's message is printed by worker.py; say ours here
            print(f"rank {self.rank}: could not write {tmp}: {reason}", file=sys.stderr, flush=True)
        self._stop(f"could not write checkpoint {dest}: {reason}; {free} on that disk",
                   hint=f"the unfinished folder was removed; the last good checkpoint is intact: {self._last_good()}. "
                        "Free some space (or lower train.keep_last), then continue with --resume")

    def load(self) -> int:
        """Restore the newest complete checkpoint; returns the step to continue from."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return 0
        step, folder = ckpts[-1]
        meta = read_meta(folder)
        if meta.get("recipe_sha256") != self.info["recipe_sha256"]:
            raise RmkitError(f"checkpoint {folder} was trained with another recipe", hint="resume with the same recipe and --set values")
        load_path, client = self.engine.load_checkpoint(str(folder / "state"), tag="ds", load_module_strict=True,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RmkitError(f"could not load the DeepSpeed state in {folder / 'state'}",
                             hint="the checkpoint is damaged; delete it to resume from the one before")
        from safetensors.torch import load_file

        rng_file = folder / "state" / f"rng-rank{self.rank}.safetensors"
        if rng_file.exists():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["torch"])
            if self.on_gpu and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"])
        print0(f"resumed from {folder} (step {step})")
        return int(client.get("rmkit_step", step))

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        from rmkit.train.progress import Progress

        r = self.recipe
        start = self.load() if self.resume else 0
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.rank == 0 and not self.resume and metrics_path.exists():
            metrics_path.unlink()
        logger = Progress(self.total, start, metrics_path, enabled=self.rank == 0, stage=self.stage)
        if r.train.eval_on_start and start == 0 and self.evals:
            logger.log({"step": 0, "eval": self.evaluate()})  # the starting point, before any update
        self.engine.train()
        for step in range(start, self.total):
            t0 = time.perf_counter()
            m = self.train_step(step)
            m["step"] = step + 1
            m["seconds"] = time.perf_counter() - t0
            m["tokens_per_s"] = m["tokens"] / max(1e-9, m["seconds"])
            done = step + 1
            maybe_die("step", done)
            if r.train.eval_every and done % r.train.eval_every == 0 and done < self.total and self.evals:
                m["eval"] = self.evaluate()
            logger.log(m)
            if r.train.save_every and done % r.train.save_every == 0 and done < self.total:
                self.save(done)
        final_eval = self.evaluate() if self.evals else {}
        logger.log({"step": self.total, "eval": final_eval, "final": True})
        logger.close()
        if self.rank == 0:  # before final/: a run whose final/ exists counts as finished
            atomic_write_json(self.run_dir / "eval_final.json", final_eval)
        self.save(self.total, final=True)
        if os.environ.get("RMKIT_FINGERPRINT"):
            self.write_fingerprint()
            print0(f"[bold green]done[/]: {self.run_dir / 'final'}")


def fit(run_dir: Path, resume: bool = False) -> None:
    runner = Runner(run_dir, resume)
    runner.build()
    runner.run()

"""The training loop on a DeepSpeed engine: ranking + imitation (GRFT/CRFT) or LM loss (BLT),
metrics, periodic eval, atomic checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rmkit import __version__
from rmkit.checkpoint import (META_FILE, finalize, list_checkpoints, prune, read_meta, step_dir)
from rmkit.console import print0
from rmkit.data.collate import collate, encode_record
from rmkit.data.records import read_records
from rmkit.errors import RmkitError
from rmkit.io import TMP_PREFIX, atomic_write_json
from rmkit.loss import combine, imitation_loss, pair_accuracy, ranking_loss
from rmkit.recipe import Recipe
from rmkit.score import SetResult, score_shard, tally
from rmkit.train.faults import maybe_die
from rmkit.train.schedule import lr_lambda, micro_batches, step_records, total_steps


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


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
                                                 head_seed=r.model.head_seed)
        self.append_eos = r.model.pooling == "eos"
        # data: encode once, lengths for grouping
        train = read_records(self.run_dir / "data" / "train.jsonl")
        self.train_enc = [self._encode(x) for x in train]
        self.lengths = [max(len(e.prompt_ids) + len(resp) for resp in e.response_ids) for e in self.train_enc]
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
        ids = step_records(step, len(self.train_enc), r.train.global_batch, r.train.seed)
        micros = micro_batches(ids, self.lengths, r.train.micro_batch, self.world, self.rank)
        blt = self.stage == "blt"
        lm_target = "whole" if blt else (r.loss.imitation_target if r.loss.imitation_weight > 0 else "none")
        sums = torch.zeros(6, dtype=torch.float64)  # rank_loss, im_loss, correct, pairs, tokens, truncated
        for mb in micros:
            batch = collate([self.train_enc[i] for i in mb], pad_id=self.tokenizer.pad_token_id,
                            padding_side=r.data.padding_side, lm_target=lm_target,
                            rows="preferred" if blt else "all")
            labels = batch.lm_labels.to(self.device) if lm_target != "none" else None
            min_chunks = 0
            if labels is not None and self.world > 1:
                # ZeRO-3 gathers lm_head collectively: every rank must run the same number of chunks
                import torch.distributed as dist

                targets = int((batch.lm_labels[:, 1:] != -100).sum())
                chunks = torch.tensor([math.ceil(targets / r.loss.lm_chunk_size)], dtype=torch.long)
                dist.all_reduce(chunks, op=dist.ReduceOp.MAX)
                min_chunks = int(chunks.item())
            out = self.engine(input_ids=batch.input_ids.to(self.device),
                              attention_mask=batch.attention_mask.to(self.device),
                              position_ids=batch.position_ids.to(self.device),
                              lm_labels=labels, lm_chunk_size=r.loss.lm_chunk_size, lm_min_chunks=min_chunks)
            if blt:
                rank_l = torch.zeros((), device=self.device)
                im_l = imitation_loss(out.lm_loss_sum, out.lm_tokens)
                loss = im_l
            else:
                rank_l = ranking_loss(out.rewards.float(), batch.better.to(self.device), batch.worse.to(self.device),
                                      r.loss.margin)
                im_l = (imitation_loss(out.lm_loss_sum, out.lm_tokens) if labels is not None
                        else torch.zeros((), device=self.device))
                loss = combine(rank_l, im_l, r.loss.ranking_weight, r.loss.imitation_weight)
            finite = torch.tensor([float(torch.isfinite(loss.detach()).item())])
            if _all_reduce(finite).item() < self.world:
                self.nonfinite(step)
            self.engine.backward(loss)
            self.engine.step()
            c, p = pair_accuracy(out.rewards.detach().float(), batch.better.to(self.device), batch.worse.to(self.device)) if not blt else (0, 0)
            sums += torch.tensor([rank_l.item(), im_l.item(), c, p, batch.n_tokens, batch.n_truncated], dtype=torch.float64)
        _all_reduce(sums)
        k = max(1, len(micros) * self.world)
        return {"loss_ranking": sums[0].item() / k, "loss_imitation": sums[1].item() / k,
                "accuracy": sums[2].item() / max(1.0, sums[3].item()), "pairs": int(sums[3].item()),
                "tokens": int(sums[4].item()), "truncated": int(sums[5].item()),
                "lr": self.scheduler.get_last_lr()[0]}

    def nonfinite(self, step: int) -> None:
        last = list_checkpoints(self.out_dir)
        where = str(last[-1][1]) if last else "none yet"
        raise RmkitError(f"non-finite loss at step {step + 1}; stopped before writing any weights",
                         hint=f"last good checkpoint: {where}. Lower train.lr, check the data, "
                              "or use fp32 (launch.precision: fp32)")

    # ---- eval ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        self.engine.eval()
        results = {}
        bs = max(1, self.recipe.train.micro_batch)
        for name, (enc, char_lens) in self.evals.items():
            res = SetResult()
            scored = score_shard(self.engine, enc, bs, self.tokenizer.pad_token_id,
                                 self.recipe.data.padding_side, self.rank, self.world, self.device)
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
        return {
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

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered full weights on rank 0 (ZeRO-3 partitions are gathered one tensor at a time)."""
        import deepspeed

        zero3 = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        sd: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if zero3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        sd[name] = p.data.detach().to("cpu", copy=True)
            elif self.rank == 0:
                sd[name] = p.data.detach().to("cpu", copy=True)
        for name, b in self.model.named_buffers():
            if self.rank == 0:
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
        sd = self.full_state_dict()
        if self.rank == 0:
            kind = "causal" if self.stage == "blt" else "reward"
            self.model.save_pretrained(folder, kind=kind, tokenizer=self.tokenizer, state_dict=sd)
            (folder / "rmkit_recipe.yaml").write_text((self.run_dir / "recipe.yaml").read_text())

    def save(self, step: int, final: bool = False) -> None:
        """All ranks write into a temporary folder; rank 0 writes meta.json last and renames."""
        dest = self.run_dir / "final" if final else step_dir(self.run_dir, step)
        tmp = dest.with_name(TMP_PREFIX + dest.name)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if not final:
            self.engine.save_checkpoint(str(tmp / "state"), tag="ds", client_state={"rmkit_step": step},
                                        save_latest=False)
            from safetensors.torch import save_file

            rng = {"torch": torch.get_rng_state()}
            if self.on_gpu:
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "state" / f"rng-rank{self.rank}.safetensors"))
        self.write_model(tmp)
        maybe_die("save", step)
        _barrier()
        if self.rank == 0:
            finalize(tmp, dest, self.meta(step))
            if not final:
                prune(self.run_dir, self.recipe.train.keep_last)
        _barrier()

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
        self.save(self.total, final=True)
        if self.rank == 0:
            atomic_write_json(self.run_dir / "eval_final.json", final_eval)
        if os.environ.get("RMKIT_FINGERPRINT"):
            self.write_fingerprint()
            print0(f"[bold green]done[/]: {self.run_dir / 'final'}")


def fit(run_dir: Path, resume: bool = False) -> None:
    runner = Runner(run_dir, resume)
    runner.build()
    runner.run()

"""The training loop: ranking + imitation (GRFT/CRFT) or LM loss (BLT) on an `Engine`, metrics,
periodic eval, checkpoints and exact resume. Read top to bottom: `Trainer.__init__` builds
everything a rank needs, `run` is the loop, `train_step` one optimizer step."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rmkit import __version__, checkpoint
from rmkit.allocator import keep_freed_memory
from rmkit.console import print0
from rmkit.data.collate import Batch, EncodedRecord, choose_layout, collate, encode_record, packed_length
from rmkit.data.records import read_records
from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json
from rmkit.loss import combine, imitation_loss, pair_accuracy, ranking_loss
from rmkit.model import RewardModel
from rmkit.recipe import Recipe
from rmkit.score import SetResult, score_shard, tally
from rmkit.tokenizer import load_tokenizer
from rmkit.train.engine import DeepSpeedEngine, Engine, LocalEngine, init_process
from rmkit.train.faults import Faults
from rmkit.train.nonfinite import NonfinitePolicy
from rmkit.train.progress import Progress
from rmkit.train.schedule import lr_lambda, micro_batches, step_records, total_steps


def micro_batch_loss(model: Any, batch: Batch, recipe: Recipe, with_lm: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """One micro-batch's forward and loss in either layout (one row per response, or packed
    with a shared prompt): rewards come back one per response in the same order, so the
    ranking pairs index them alike. Returns (loss, ranking term, imitation term, output)."""
    out = model(**batch.model_inputs(device, with_lm=with_lm), lm_chunk_size=recipe.loss.lm_chunk_size)
    im_l = imitation_loss(out.lm_loss) if with_lm else torch.zeros((), device=device)
    if recipe.stage == "blt":
        return im_l, torch.zeros((), device=device), im_l, out
    rank_l = ranking_loss(out.rewards.float(), batch.better.to(device), batch.worse.to(device), recipe.loss.margin)
    loss = combine(rank_l, im_l, recipe.loss.ranking_weight, recipe.loss.imitation_weight)
    return loss, rank_l, im_l, out


def pad_lm_targets(batch: Batch, n: int) -> Batch:
    """`batch` with zero-weight imitation targets appended up to `n`. ZeRO-3 gathers lm_head
    collectively, so every rank must call it equally often: padding each rank's targets to the
    largest count over ranks gives every rank the same number of LM-loss chunks. A padding
    target reads position (0, 0) with weight 0, so it adds exactly 0 to the loss and its gradient."""
    extra = n - batch.n_lm_targets
    if extra <= 0:
        return batch
    return dataclasses.replace(
        batch,
        lm_index=torch.cat([batch.lm_index, batch.lm_index.new_zeros((extra, 2))]),
        lm_token=torch.cat([batch.lm_token, batch.lm_token.new_zeros((extra,))]),
        lm_weight=torch.cat([batch.lm_weight, batch.lm_weight.new_zeros((extra,))]))


def build_model(recipe: Recipe, model_path: Path) -> RewardModel:
    """The reward model a recipe trains: decoder + head, LoRA when asked, checkpointing on."""
    model = RewardModel.from_pretrained(model_path, pooling=recipe.model.pooling, dtype=torch.float32,
                                        head_seed=recipe.model.head_seed,
                                        trust_remote_code=recipe.model.trust_remote_code)
    if recipe.model.lora is not None:  # LoRA on the decoder; base frozen, score trained (rmkit/lora.py)
        from rmkit.lora import apply_lora

        if recipe.stage == "blt":
            raise RmkitError("model.lora applies to grft/crft; blt trains the whole LM",
                             where="model.lora", hint="remove model.lora from the blt recipe")
        apply_lora(model, recipe.model.lora, seed=recipe.train.seed)
    every = recipe.train.checkpoint_every()
    if every:
        model.gradient_checkpointing_enable(every_n_layers=every)  # non-reentrant (transformers' default)
    return model


class Trainer:
    """Everything one rank needs; `run` trains, evaluates and saves.

    engine="deepspeed" (what `rmkit train` starts, one per rank) or "local" (one process, plain
    torch; tests and benches)."""

    def __init__(self, run_dir: Path, resume: bool = False, engine: str = "deepspeed") -> None:
        self.run_dir = run_dir
        self.resume = resume
        self.recipe = r = Recipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
        self.info: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
        ds_config = json.loads((run_dir / "ds_config.json").read_text())
        self.stage = r.stage
        self.blt = r.stage == "blt"
        if engine == "deepspeed":
            rank, world, device = init_process(r.train.seed)
        else:
            rank, world, device = 0, 1, torch.device("cpu")
            torch.manual_seed(r.train.seed)
        self.rank, self.world, self.device = rank, world, device
        if device.type == "cpu":  # before the model and data: every allocation after this is reused
            print0(f"allocator: {keep_freed_memory()}")
        model_path = Path(self.info["model_path"])
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=r.model.trust_remote_code)
        self.model = build_model(r, model_path)
        self.append_eos = r.model.pooling == "eos"
        # data: encoded once; a record's prompt group and its length for micro-batch grouping
        self.train_enc = [self._encode(x) for x in read_records(run_dir / "data" / "train.jsonl")]
        packed = r.data.prefix_sharing and not self.blt
        self.lengths = [packed_length(e) if packed else max(len(e.prompt_ids) + len(x) for x in e.response_ids)
                        for e in self.train_enc]
        prompt_group: dict[tuple[int, ...], int] = {}
        self.groups = [prompt_group.setdefault(tuple(e.prompt_ids), len(prompt_group)) for e in self.train_enc]
        self.evals: dict[str, tuple[list[EncodedRecord], list[list[int]]]] = {}
        for name in r.data.eval:
            recs = read_records(run_dir / "data" / f"eval-{name}.jsonl")
            self.evals[name] = ([self._encode(x) for x in recs], [[len(s) for s in x.responses] for x in recs])
        if len(self.train_enc) < r.train.global_batch:
            raise RmkitError(f"{len(self.train_enc)} training records is fewer than one global batch "
                             f"({r.train.global_batch})", where="train.global_batch",
                             hint="lower train.global_batch or add data")
        t = r.train
        self.total = total_steps(len(self.train_enc), t.global_batch, t.epochs, t.max_steps)
        schedule = lambda s: lr_lambda(s, self.total, t.warmup_steps, t.schedule, t.min_lr_ratio)  # noqa: E731
        self.engine: Engine = (DeepSpeedEngine(self.model, ds_config, schedule, rank, world, device)
                               if engine == "deepspeed" else LocalEngine(self.model, ds_config, schedule, device))
        self.lm_target = "whole" if self.blt else (r.loss.imitation_target if r.loss.imitation_weight > 0 else "none")
        self.attention_scale = self.model.attention_scale
        self.metrics_path = run_dir / "metrics.jsonl"
        self.faults = Faults.from_env(rank)
        self.nonfinite = NonfinitePolicy(t.on_nonfinite, self.engine, self.metrics_path,
                                         lambda: checkpoint.last_good(run_dir))
        self._base_fingerprint: str | None = None  # LoRA runs: the base model's, computed at the first save

    def _encode(self, rec: Any) -> EncodedRecord:
        d = self.recipe.data
        return encode_record(rec, self.tokenizer, d.max_length, d.truncation_side, self.append_eos)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> Path:
        r = self.recipe
        start = self.restore() if self.resume else 0
        if self.rank == 0 and not self.resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        logger = Progress(self.total, start, self.metrics_path, enabled=self.rank == 0, stage=self.stage)
        if r.train.eval_on_start and start == 0 and self.evals:
            logger.log({"step": 0, "eval": self.evaluate()})  # the starting point, before any update
        self.engine.train()
        for step in range(start, self.total):
            t0 = time.perf_counter()
            m = self.train_step(step)
            done = step + 1
            m.update(step=done, seconds=time.perf_counter() - t0)
            m["tokens_per_s"] = m["tokens"] / max(1e-9, m["seconds"])
            self.faults.after_step(done)
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
        final = self.save(self.total, final=True)
        if os.environ.get("RMKIT_FINGERPRINT"):
            self.write_fingerprint()
        print0(f"[bold green]done[/]: {final}")
        return final

    # ---- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """Step `step` (0-based): this rank's micro-batches of the step's records, one engine
        step each (the engine accumulates); the metrics are summed over ranks."""
        r = self.recipe
        ids = step_records(step, len(self.train_enc), r.train.global_batch, r.train.seed, self.groups)
        micros = micro_batches(ids, self.lengths, r.train.micro_batch, self.world, self.rank, self.groups)
        self.nonfinite.settle(step)  # the previous step's update: applied or dropped?
        sums = torch.zeros(6, dtype=torch.float64)  # rank_loss, im_loss, correct, pairs, tokens, truncated
        for i, mb in enumerate(micros):
            batch = self._collate([self.train_enc[j] for j in mb])
            loss, rank_l, im_l, out = micro_batch_loss(self.engine, batch, r, self.lm_target != "none", self.device)
            if i == 0:
                loss = self.faults.loss(loss, step)
            self.nonfinite.check_loss(loss, step)
            self.engine.backward(loss)
            self.engine.step()
            c, p = (0, 0) if self.blt else pair_accuracy(out.rewards.detach().float(), batch.better.to(self.device),
                                                          batch.worse.to(self.device))
            sums += torch.tensor([rank_l.item(), im_l.item(), c, p, batch.n_tokens, batch.n_truncated],
                                 dtype=torch.float64)
        self.engine.all_reduce(sums)
        k = max(1, len(micros) * self.world)
        rank_mean, im_mean = sums[0].item() / k, sums[1].item() / k
        total = im_mean if self.blt else r.loss.ranking_weight * rank_mean + r.loss.imitation_weight * im_mean
        return {"loss": total, "loss_ranking": rank_mean, "loss_imitation": im_mean,
                "accuracy": sums[2].item() / max(1.0, sums[3].item()), "pairs": int(sums[3].item()),
                "tokens": int(sums[4].item()), "truncated": int(sums[5].item()), "lr": self.engine.lr}

    def _collate(self, encs: list[EncodedRecord]) -> Batch:
        r = self.recipe
        layout = choose_layout(encs, r.data.prefix_sharing and not self.blt, self.model.span_attention,
                               self.device.type, self.attention_scale)
        batch = collate(encs, pad_id=self.tokenizer.pad_token_id, padding_side=r.data.padding_side,
                        lm_target=self.lm_target, rows="preferred" if self.blt else "all", layout=layout,
                        reduction="token" if self.blt else r.loss.imitation_reduction)
        if self.lm_target != "none" and self.world > 1:
            most = self.engine.all_reduce(torch.tensor([batch.n_lm_targets], dtype=torch.long), op="max")
            batch = pad_lm_targets(batch, int(most.item()))
        return batch

    # ---- eval ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        self.engine.eval()
        results = {}
        bs = max(1, self.recipe.train.micro_batch)
        for name, (enc, char_lens) in self.evals.items():
            res = SetResult()
            scored = score_shard(self.engine, enc, bs, self.tokenizer.pad_token_id, self.recipe.data.padding_side,
                                 self.rank, self.world, self.device, prefix_sharing=self.recipe.data.prefix_sharing)
            for i, rewards in scored:
                tally(res, enc[i], rewards, char_lens[i])
            self.faults.during_eval(self.engine.global_steps)
            results[name] = SetResult.from_tensor(self.engine.all_reduce(res.as_tensor())).summary()
        self.engine.train()
        return results

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, step: int, final: bool = False) -> Path:
        """A training checkpoint (weights + engine state) or final/, after the checks that keep a
        diverged run from ever writing weights."""
        self.nonfinite.settle(step)
        params = list(self.model.named_parameters())
        dest = self.run_dir / "final" if final else checkpoint.step_dir(self.run_dir, step)
        self.faults.spoil_weights(step, params, self.engine.local)
        checkpoint.check_finite(self.engine, params, dest, step, self.run_dir)
        return checkpoint.save(self.engine, self.run_dir, step, final, self.write_model, lambda: self.meta(step),
                               self.recipe.train.keep_last, before_publish=self.faults.before_publish(step))

    def restore(self) -> int:
        """Continue from the newest complete checkpoint; returns the step to start from."""
        step, folder = checkpoint.restore_latest(self.engine, self.run_dir, self.info["recipe_sha256"])
        if folder is not None:
            print0(f"resumed from {folder} (step {step})")
        return step

    def meta(self, step: int) -> dict[str, Any]:
        r = self.recipe
        meta = {
            "stage": r.stage, "domain": r.domain, "step": step, "total_steps": self.total,
            "kind": "causal" if self.blt else "reward",
            "parent": self.info.get("parent"), "base_model": self.info["model_path"],
            "recipe_sha256": self.info["recipe_sha256"], "data_manifest_sha256": self.info["data_manifest_sha256"],
            "rmkit_version": __version__, "git_commit": self.info.get("git_commit"),
            "pooling": r.model.pooling,
            "encoding": {"split": "prompt+response", "max_length": r.data.max_length,
                         "truncation_side": r.data.truncation_side, "padding_side": r.data.padding_side,
                         "append_eos": self.append_eos},
        }
        if r.model.lora is not None:  # an adapter checkpoint names its base (path + fingerprint)
            from rmkit.lora import adapter_meta, base_fingerprint, count_parameters

            base = Path(self.info["model_path"])
            if self._base_fingerprint is None:
                self._base_fingerprint = base_fingerprint(base)
            meta.update(adapter_meta(r.model.lora, base, self._base_fingerprint, *count_parameters(self.model)))
        return meta

    def write_model(self, folder: Path) -> None:
        """The model files of a checkpoint: a Hugging Face folder, or LoRA weights + head only."""
        recipe_text = (self.run_dir / "recipe.yaml").read_text()
        if self.recipe.model.lora is not None:
            from rmkit.lora import write_adapter

            sd = self.engine.full_state_dict(trainable_only=True)
            if self.rank == 0:
                write_adapter(folder, sd, self.recipe.model.lora, Path(self.info["model_path"]),
                              self.model.base_prefix, self.tokenizer)
        else:
            sd = self.engine.full_state_dict()
            if self.rank == 0:
                self.model.save_pretrained(folder, kind="causal" if self.blt else "reward",
                                           tokenizer=self.tokenizer, state_dict=sd)
        if self.rank == 0:
            (folder / "rmkit_recipe.yaml").write_text(recipe_text)

    def write_fingerprint(self) -> None:
        """Every rank hashes the full weights it sees (gathered under ZeRO-3): ranks must agree."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters(), key=lambda x: x[0]):
            with self.engine.gathered(p):
                h.update(name.encode())
                h.update(p.data.detach().float().cpu().numpy().tobytes())
        (self.run_dir / f"fingerprint-rank{self.rank}.txt").write_text(h.hexdigest())


def fit(run_dir: Path, resume: bool = False) -> Path:
    """Train the run directory `run_dir` on this rank (the worker's entry point)."""
    return Trainer(run_dir, resume).run()

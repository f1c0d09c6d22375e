"""Training MFU on a GPU: a ~1.1B-parameter Llama-shaped reward model, random weights, bf16.

    python bench/mfu.py                 # GPU: TinyLlama-1.1B shape (SmolLM2's 49k vocabulary), seq 1024
    python bench/mfu.py --tiny          # a 2-layer model in fp32 on the CPU: checks the script runs

Throughput does not depend on the weights, so the model is built from a config with random
weights (cached under $RMKIT_CACHE/bench) and the data are synthetic pairs whose every row is
exactly --seq-len tokens (a prompt of half that, a response of the other half). Training is
rmkit's own step: `Trainer.train_step` (RewardModel + ranking loss + the DeepSpeed engine, world
size 1, in-process), as `bench/throughput.py` runs it.

Model FLOPs per trained token: 6 * N (N = parameters outside the embedding and LM head, which a
reward model never multiplies by) + 6 * L * d * S for attention (the score and value matmuls
over an average causal context of S/2 keys, forward and backward), with S the row length, so
a response shares its prompt's FLOPs and a token computed once is counted once. Tokens are the
distinct positions a step computes (prefix sharing computes a prompt once). MFU = achieved model
FLOP/s over the GPU's measured bf16 matmul rate (an 8192^3 matmul, repeated), not the datasheet
peak. Prints a table and appends a section to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(highlight=False)

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
    "tiny": (64, 2, 4, 2, 128),
}


def build_model(shape: str, tokenizer_from: Path, dtype: torch.dtype) -> Path:
    """A Llama folder with random weights and SmolLM2's tokenizer (cached)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rmkit.io import atomic_dir
    from rmkit.models import cache_dir

    out = cache_dir() / "bench" / f"llama-{shape}-random"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    console.print(f"built {out.name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured FLOP/s of one square matmul, the ceiling MFU is taken against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_pairs(path: Path, n: int, seq_len: int) -> None:
    """Rows of exactly seq_len tokens with the SmolLM2 tokenizer: ' the' and ' yes'/' no' are
    one token each; eos pooling appends the last one."""
    from rmkit.data.records import Record, write_records

    half = seq_len // 2
    recs = [Record(" the" * half, (" yes" * (seq_len - half - 1), " no" * (seq_len - half - 1)), (1.0, 0.0))
            for _ in range(n)]
    write_records(path, recs)


def run(args: argparse.Namespace, model: Path, device: torch.device) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from rmkit.recipe import Recipe
    from rmkit.train.loop import Trainer
    from rmkit.train.rundir import plan_run, write_run_dir

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "pairs.jsonl"
    synthetic_pairs(data, args.batch * (args.warmup + args.steps), args.seq_len)
    recipe = Recipe.model_validate({
        "stage": "grft", "model": {"path": str(model), "pooling": "eos"},
        "data": {"train": [{"path": str(data), "format": "canonical"}], "max_length": args.seq_len,
                 "padding_side": "right", "prefix_sharing": not args.no_prefix_sharing},
        "train": {"lr": 1e-5, "schedule": "constant", "global_batch": args.batch, "micro_batch": args.micro_batch,
                  "max_steps": args.warmup + args.steps, "seed": 0, "output_dir": str(tmp / "run"),
                  "gradient_checkpointing": args.gradient_checkpointing},
        "launch": {"deepspeed": args.zero, "gpus": 1, "precision": args.precision},
    })
    plan = plan_run(recipe)
    write_run_dir(recipe, plan)
    runner = Trainer(plan.run_dir)
    runner.engine.train()
    for step in range(args.warmup):
        runner.train_step(step)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pairs = tokens = 0
    for step in range(args.warmup, args.warmup + args.steps):
        out = runner.train_step(step)
        pairs += out["pairs"]
        tokens += out["tokens"]
    sync(device)
    seconds = time.perf_counter() - t0
    base = runner.model.base_model
    emb = base.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in base.parameters()) - emb
    cfg = runner.model.config.get_text_config()
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "pairs": pairs, "tokens": tokens, "n_params": n, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "peak_gib": mem}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model, fp32, on whatever device there is")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024; 128 with --tiny)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=None, help="pairs per forward (default: --batch)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--zero", default="zero0", help="DeepSpeed config name (zero0..zero3)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-prefix-sharing", action="store_true")
    ap.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="append results here ('' = don't)")
    args = ap.parse_args(argv)
    args.micro_batch = args.micro_batch or args.batch
    args.seq_len = args.seq_len or (128 if args.tiny else 1024)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.tiny:
        raise SystemExit("no GPU here: the 1B MFU run needs one (use --tiny to check the script on a CPU)")
    args.precision = "bf16" if cuda and not args.tiny else "fp32"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    from rmkit.models import resolve_model

    model = build_model("tiny" if args.tiny else "1b", resolve_model("smollm2-135m"), dtype)
    peak = matmul_peak(device, dtype, 8192 if cuda else 1024, 50 if cuda else 5)
    res = run(args, model, device)
    tok_s = res["tokens"] / res["seconds"]
    flops_tok = 6 * res["n_params"] + 6 * res["layers"] * res["hidden"] * args.seq_len
    achieved = tok_s * flops_tok
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    cols = ("model", "params (non-embedding)", "precision", "seq len", "pairs/s", "tokens/s", "model TFLOP/s",
            f"measured {args.precision} matmul TFLOP/s", "MFU", "peak GiB")
    n = res["n_params"]
    cells = [model.name, f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M", args.precision, str(args.seq_len),
             f"{res['pairs'] / res['seconds']:.2f}", f"{tok_s:.0f}", f"{achieved / 1e12:.2f}", f"{peak / 1e12:.1f}",
             f"{achieved / peak:.1%}", f"{res['peak_gib']:.1f}"]
    t = Table(title=f"training MFU on {where}: batch {args.batch} pairs (micro {args.micro_batch}), {args.zero}, "
                    f"{args.steps} timed steps")
    t.add_column("")
    t.add_column("", justify="right")
    for c, v in zip(cols, cells):
        t.add_row(c, v)
    console.print(t)
    if args.docs:
        cmd = "python bench/mfu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        lines = [f"\n### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — MFU, {model.name}", "",
                 f"- command: `{cmd.strip()}`", f"- device: {where}; torch {torch.__version__}",
                 f"- batch {args.batch} pairs (micro {args.micro_batch}), {args.zero}, prefix sharing "
                 f"{'off' if args.no_prefix_sharing else 'on'}, gradient checkpointing "
                 f"{'on' if args.gradient_checkpointing else 'off'}, {args.warmup} warmup + {args.steps} timed steps",
                 "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols), "| " + " | ".join(cells) + " |", ""]
        with open(args.docs, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        console.print(f"appended to {args.docs}")


if __name__ == "__main__":
    main()

"""Load and memory figures for `rmkit serve` (docs/benchmarks.md, "rmkit serve").

load: a bounded number of concurrent clients on 127.0.0.1 for a fixed time against
  - rmkit serve (batching window, token budget per forward), and
  - a naive server: the same process with --max-batch-tokens 1 --batch-window-ms 0, so every
    request is its own forward (what OpenRLHF's serve_rm does at its default batch size).
  Each request is a prompt and 4 responses (a GRPO group). Reported: requests/s, p50/p99
  latency, and the checks: every request answered exactly once (ids echoed back through the
  prompt), no 5xx, and every reward equal to offline scoring (`score_records`, 1e-4).
memory: N LoRA domains on one base in one registry against the N merged models loaded side by
  side: bytes of distinct weight storage, and the process's RSS growth, each in a fresh process.

    python bench/serve_load.py load --clients 16 --seconds 20 [--threads 1]
    python bench/serve_load.py memory --adapters 4

The model is a random Llama (hidden 256, 4 layers for load; hidden 512, 8 layers for memory)
with the test suite's byte-level tokenizer: figures of the serving machinery, not of a real RM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
LOCK = Path("/tmp/rmkit_bench.lock")
ENC = {"max_length": 256, "truncation_side": "left", "padding_side": "right", "append_eos": False}


def build_base(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama saved as an rmkit GRFT-like reward checkpoint (meta.json with its encoding)."""
    import torch
    from conftest import build_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from rmkit.checkpoint import finalize
    from rmkit.model import RewardModel

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=hidden * 8 // 3, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    lm_dir = out / "lm"
    LlamaForCausalLM(config).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    model = RewardModel.from_pretrained(lm_dir)
    model.save_pretrained(out / ".tmp-grft", kind="reward", tokenizer=tok)
    finalize(out / ".tmp-grft", out / "grft", {"stage": "grft", "kind": "reward", "step": 1, "pooling": "last",
                                               "encoding": ENC})
    return out / "grft"


def build_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer

    from rmkit.checkpoint import finalize
    from rmkit.lora import adapter_meta, apply_lora, base_fingerprint, count_parameters, write_adapter
    from rmkit.model import RewardModel
    from rmkit.recipe import LoraSpec

    spec = LoraSpec(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    m = RewardModel.from_pretrained(base)
    apply_lora(m, spec, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tmp = out.parent / f".tmp-{out.name}"
    tmp.mkdir(parents=True)
    write_adapter(tmp, {n: p for n, p in m.named_parameters() if p.requires_grad}, spec, base, m.base_prefix,
                  AutoTokenizer.from_pretrained(str(base)))
    finalize(tmp, out, {"stage": "crft", "domain": out.name, "step": 1, "pooling": "last", "encoding": ENC,
                        **adapter_meta(spec, base, base_fingerprint(base), *count_parameters(m))})
    return out


# ---- load ---------------------------------------------------------------------------------------
def _prompt(i: int) -> str:
    return f"## Human:\nrequest {i}: how should a quarterly report about item {i % 7} open?\n\n## Assistant:\n"


RESPONSES = [" The bottom line first: revenue, margin and the one decision needed.", " A long story.",
             " With a table of every number we have, in no order.", " I do not know."]
POOL = 64  # distinct prompts; request k uses prompt k % POOL with the request id appended


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve(ckpt: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rmkit", "serve", str(ckpt), "--port", str(port), *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}") from None
            time.sleep(0.2)
    raise SystemExit("server did not start")


def _drive(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads, each sending its next request as soon as the last is answered."""
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))
    lock = threading.Lock()
    results: list[tuple[int, int, float, Any]] = []  # (request id, status, latency, body)

    def client() -> None:
        while time.monotonic() < stop:
            with lock:
                rid = next(counter)
            # the id rides in the prompt's key, and is checked against the answer's rewards below
            t0 = time.perf_counter()
            status, body = _post(url + "/v1/score", {"prompt": _prompt(rid % POOL), "responses": RESPONSES})
            dt = time.perf_counter() - t0
            with lock:
                results.append((rid, status, dt, body))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = sorted(r[2] for r in results if r[1] == 200)
    ids = [r[0] for r in results]
    return {"results": results, "wall_s": wall, "requests": len(results),
            "ok": sum(r[1] == 200 for r in results), "unique_ids": len(set(ids)), "sent": max(ids) + 1 if ids else 0,
            "rps": round(sum(r[1] == 200 for r in results) / wall, 2),
            "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None}


def load(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rmkit.data.records import Record
    from rmkit.evaluate import score_records
    from rmkit.inspection import inspect_checkpoint
    from rmkit.scorer import load_scorer

    work = Path(tempfile.mkdtemp(prefix="rmkit-serve-load-"))
    try:
        base = build_base(work, 256, 4)
        scorer = load_scorer(inspect_checkpoint(base), torch.device("cpu"), torch.float32)
        want = score_records(scorer, [Record(_prompt(i), tuple(RESPONSES), (0.0,) * 4) for i in range(POOL)])[1]
        del scorer
        out: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds, "responses_per_request": 4,
                               "load_average_at_start": os.getloadavg()[0], "cpus": os.cpu_count(),
                               "server_threads": args.threads,
                               "model": "random Llama hidden 256, 4 layers", "servers": {}}
        for name, extra in (("rmkit serve", []), ("naive (one forward per request)",
                                                  ["--max-batch-tokens", "1", "--batch-window-ms", "0"])):
            proc, url = _serve(base, extra + ["--max-pending", str(4 * args.clients), "--threads", str(args.threads)])
            try:
                _drive(url, min(2, args.clients), 2.0)  # warm-up
                r = _drive(url, args.clients, args.seconds)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            wrong = sum(1 for rid, status, _, body in r["results"] if status == 200 and not all(
                abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(body["rewards"], want[rid % POOL])))
            r.pop("results")
            r["lost_or_duplicated"] = r["sent"] - r["unique_ids"] + (r["requests"] - r["unique_ids"])
            r["not_200"] = r["requests"] - r["ok"]
            r["rewards_differ_from_offline"] = wrong
            r["exit_code"] = proc.returncode
            r["load_average_after"] = round(os.getloadavg()[0], 2)
            out["servers"][name] = r
            print(name, json.dumps(r), flush=True)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- memory -------------------------------------------------------------------------------------
def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _measure(kind: str, paths: list[str]) -> None:
    """In a fresh process: load the domains and print bytes of weights and RSS growth."""
    import gc

    import torch
    import transformers  # noqa: F401  imports paid before the baseline

    from rmkit.serve.registry import Registry

    torch.set_num_threads(1)
    gc.collect()
    before = _rss()
    reg = Registry(torch.device("cpu"), torch.float32)
    if kind == "adapters":
        reg.add("default", paths[0])
        for i, p in enumerate(paths[1:]):
            reg.add(f"d{i}", p)
    else:
        for i, p in enumerate(paths):
            reg.add(f"d{i}", p)
    gc.collect()
    print(json.dumps({"weights_bytes": reg.memory_bytes(), "rss_growth_bytes": _rss() - before,
                      "models": len(reg.models), "domains": len(reg.domains)}))


def memory(args: argparse.Namespace) -> dict[str, Any]:
    from rmkit.merge import merge

    work = Path(tempfile.mkdtemp(prefix="rmkit-serve-mem-"))
    try:
        base = build_base(work, 512, 8)
        adapters = [build_adapter(base, work / f"adapter{i}", seed=i + 1) for i in range(args.adapters)]
        merged = []
        for a in adapters:
            merge(a, work / f"merged-{a.name}")
            merged.append(work / f"merged-{a.name}")
        out: dict[str, Any] = {"adapters": args.adapters, "model": "random Llama hidden 512, 8 layers, fp32",
                               "adapter_files_bytes": sum((a / "adapter_model.safetensors").stat().st_size
                                                          for a in adapters)}
        for kind, paths in (("adapters", [base, *adapters]), ("merged", merged)):
            res = subprocess.run([sys.executable, __file__, "_measure", kind, *map(str, paths)], capture_output=True,
                                 text=True, check=True)
            out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
            print(kind, json.dumps(out[kind]), flush=True)
        out["weights_ratio_merged_over_adapters"] = round(out["merged"]["weights_bytes"] / out["adapters"]["weights_bytes"], 2)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_measure":
        _measure(sys.argv[2], sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--clients", type=int, default=16)
    lp.add_argument("--seconds", type=float, default=20.0)
    lp.add_argument("--threads", type=int, default=1, help="the servers' --threads")
    mp = sub.add_parser("memory")
    mp.add_argument("--adapters", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    if LOCK.exists():
        raise SystemExit(f"{LOCK} exists: another benchmark holds the CPU; run this later")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    figures = load(args) if args.cmd == "load" else memory(args)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Fault soak: a small CPU training killed many times, at random moments and in every phase, and
resumed with `--resume` after each; every run must end with exactly the weights, metrics and final
evaluation of an uninterrupted run, and after every failure no checkpoint folder that lacks a file
may be listed or loaded.

    python bench/fault_soak.py --kills 20 --seed 1              # about 10-20 minutes on 2 CPU cores
    python bench/fault_soak.py --kills 6 --minutes 4 --out /tmp/soak

Each launch of the victim run draws one failure:
  external    SIGKILL of the whole process group (CLI, launcher, ranks) after a random delay
  progress    SIGKILL of the group at a random moment after training passes a random step
  step, save, eval   RMKIT_FAULT hooks: SIGKILL after a step / mid-checkpoint / mid-evaluation
  nan         rank 0's loss turns NaN (train.on_nonfinite: stop): exit 2 naming the last good checkpoint
  enospc      ENOSPC while a checkpoint is written: exit 2, the temporary folder removed
  nanweights  a weight turns NaN before a save: exit 2, nothing written
When a run finishes before the kill count is reached, a new victim run starts. As root, a last
phase puts a run on a real tmpfs sized for one checkpoint but not two: the second save must fail
cleanly, and after the tmpfs is enlarged the run resumes to the same weights. Writes OUT/soak.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import build_tiny_model as tiny_model  # noqa: E402
from test_faults import _metrics as metrics  # noqa: E402
from test_faults import check_checkpoints as check  # noqa: E402
from test_faults import group_alive, last_step  # noqa: E402

from rmkit.checkpoint import META_FILE, list_checkpoints  # noqa: E402
from rmkit.data.records import Record, write_records  # noqa: E402

STEPS, SAVE_EVERY, EVAL_EVERY = 12, 2, 3
MODES = ("external", "progress", "step", "save", "eval", "nan", "enospc", "nanweights")
EXPECTED = {  # exit-2 failures: the message the user must see
    "nan": "non-finite loss at step {k}; stopped before writing any weights",
    "enospc": "could not write checkpoint {ckpt}/step-{k:06d}: No space left on device",
    "nanweights": "refusing to write {ckpt}/step-{k:06d}: 1 weight tensor(s) hold NaN or infinity at step {k}",
}


def recipe(work: Path, model: Path, name: str, out: Path, gpus: int) -> Path:
    data = work / "toy.jsonl"
    if not data.exists():
        write_records(data, [Record(f"## Human:\nquestion {i} about item {i % 5}\n\n## Assistant:\n",
                                    (" yes that is right", " no that is wrong"), (1.0, 0.0), "toy", "business")
                             for i in range(16)])
    p = work / f"{name}.yaml"
    p.write_text(f"""stage: grft
model: {{path: "{model}"}}
data: {{train: [{{path: "{data}"}}], eval: {{toy: {{path: "{data}", limit: 8}}}}, max_length: 64}}
train: {{lr: 5.0e-3, schedule: cosine, warmup_steps: 2, global_batch: 8, micro_batch: 2, max_steps: {STEPS},
        save_every: {SAVE_EVERY}, eval_every: {EVAL_EVERY}, keep_last: 2, seed: 7, output_dir: "{out}"}}
launch: {{deepspeed: zero2, gpus: {gpus}, precision: fp32}}
""")
    return p


def env(fault: str | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "RMKIT_FAULT"}
    e.update(PYTHONPATH=str(REPO), COLUMNS="200", PYTHONUNBUFFERED="1")
    if fault:
        e["RMKIT_FAULT"] = fault
    return e


def argv(rec: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "rmkit", "train", "grft", "--recipe", str(rec)] + (["--resume"] if resume else [])


def same_as_ref(run: Path, ref: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    return (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and metrics(ref) == metrics(run)
            and json.loads((ref / "eval_final.json").read_text()) == json.loads((run / "eval_final.json").read_text()))


def kill_group(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL everything in the run's session; True if it was still running."""
    running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=120)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), "a process of the killed run survived"
    return running


def one_launch(rec: Path, run: Path, mode: str, rng: random.Random, launch_s: float, log: Path) -> dict:
    """Start the victim once with the drawn failure; returns what happened."""
    resume = (run / "run.json").exists()
    done_ckpt = max([0] + [s for s, _ in list_checkpoints(run)])
    future = list(range(done_ckpt + 1, STEPS + 1))
    saves = [k for k in future if k % SAVE_EVERY == 0 and k < STEPS]
    evals = [k for k in future if k % EVAL_EVERY == 0 and k < STEPS]
    pool = {"step": future, "save": saves, "eval": evals, "nan": future, "enospc": saves, "nanweights": saves}
    if mode in pool and not pool[mode]:
        mode = "external"
    t0 = time.monotonic()
    if mode in ("external", "progress"):
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv(rec, resume), stdout=f, stderr=subprocess.STDOUT, env=env(),
                                    start_new_session=True)
        if mode == "external":
            deadline = t0 + rng.uniform(0.3, launch_s)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            at = "t+%.1fs" % (time.monotonic() - t0)
        else:
            target = rng.randint(done_ckpt + 1, STEPS)
            while last_step(run) < target and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            at = f"after step {last_step(run)}"
        running = kill_group(proc)
        return {"mode": mode, "at": at, "killed_running": running, "rc": proc.returncode,
                "seconds": time.monotonic() - t0}
    k = rng.choice(pool[mode])
    res = subprocess.run(argv(rec, resume), capture_output=True, text=True, env=env(f"{mode}:{k}"), timeout=900)
    with open(log, "a") as f:
        f.write(res.stdout + res.stderr)
    out = {"mode": mode, "at": f"{mode}:{k}", "killed_running": True, "rc": res.returncode,
           "seconds": time.monotonic() - t0}
    if mode in EXPECTED:
        want = EXPECTED[mode].format(k=k, ckpt=run / "checkpoints")
        ok = res.returncode == 2 and want in res.stderr and "Traceback" not in res.stderr
        assert ok, f"{mode}:{k}: exit {res.returncode}\n{res.stderr[-3000:]}"
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")] \
            if (run / "checkpoints").is_dir() else True, "a failed save left its temporary folder"
    else:
        assert res.returncode != 0, f"{mode}:{k} did not kill the run"
    return out


def finish(rec: Path, run: Path, log: Path) -> None:
    res = subprocess.run(argv(rec, (run / "run.json").exists()), capture_output=True, text=True, env=env(),
                         timeout=900)
    with open(log, "a") as f:
        f.write(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]


def tmpfs_phase(work: Path, model: Path, ref: Path, gpus: int) -> dict:
    """A real full disk: the run folder on a tmpfs with room for one checkpoint but not two."""
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    ckpt_kib = sum(f.stat().st_size for f in (ref / "checkpoints").iterdir().__next__().rglob("*") if f.is_file()) // 1024
    base_kib = sum(f.stat().st_size for f in (ref / "data").rglob("*") if f.is_file()) // 1024 + 64
    size_kib = base_kib + ckpt_kib * 3 // 2 + 64  # metrics, recipe, run.json: a few pages
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        return {"skipped": "cannot mount a tmpfs (needs root)"}
    try:
        run = mnt / "run"
        rec = recipe(work, model, "tmpfs", run, gpus)
        res = subprocess.run(argv(rec, False), capture_output=True, text=True, env=env(), timeout=900)
        full = {"rc": res.returncode, "stderr": res.stderr.strip().splitlines()[-4:], "checkpoints": check(run),
                "tmp_left": [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
                if (run / "checkpoints").is_dir() else []}
        assert res.returncode == 2 and "Traceback" not in res.stderr and "No space left on device" in res.stderr, \
            res.stderr[-3000:]
        assert not full["tmp_left"] and full["checkpoints"], full
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        finish(rec, run, work / "tmpfs.log")
        full["resumed_same_as_ref"] = same_as_ref(run, ref)
        full["tmpfs_kib"] = size_kib
        return full
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="failures to inflict in total")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=60.0, help="stop inflicting failures after this long")
    ap.add_argument("--gpus", type=int, default=1, help="processes per run (CPU ranks)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rmkit-fault-soak"))
    ap.add_argument("--no-tmpfs", action="store_true")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    work = args.out
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny")
    ref = work / "ref"
    t0 = time.monotonic()
    finish(recipe(work, model, "ref", ref, args.gpus), ref, work / "ref.log")
    launch_s = time.monotonic() - t0
    print(f"reference run: {launch_s:.0f} s", flush=True)

    events, victims, n = [], [], 0
    start = time.monotonic()
    while n < args.kills and time.monotonic() - start < args.minutes * 60:
        run = work / f"victim{len(victims) + 1}"
        rec = recipe(work, model, run.name, run, args.gpus)
        victims.append(run)
        while n < args.kills and time.monotonic() - start < args.minutes * 60 and not (run / "final" / META_FILE).exists():
            ev = one_launch(rec, run, rng.choice(MODES), rng, launch_s, work / f"{run.name}.log")
            ev["checkpoints_after"] = check(run)
            ev["victim"] = run.name
            events.append(ev)
            n += 1
            print(f"{n:3d} {run.name} {ev['mode']:<10} {ev['at']:<16} rc={ev['rc']} "
                  f"running={ev['killed_running']} ckpts={ev['checkpoints_after']} ({ev['seconds']:.0f} s)", flush=True)
    results = {}
    for run in victims:
        finish(recipe(work, model, run.name, run, args.gpus), run, work / f"{run.name}.log")
        results[run.name] = same_as_ref(run, ref)
        print(f"{run.name}: final weights, metrics and eval equal the uninterrupted run: {results[run.name]}")
    tmpfs = {"skipped": "--no-tmpfs"} if args.no_tmpfs else tmpfs_phase(work, model, ref, args.gpus)
    print(f"tmpfs full disk: {tmpfs}")
    summary = {"kills": n, "by_mode": dict(collections.Counter(e["mode"] for e in events)),
               "killed_while_running": sum(e["killed_running"] for e in events),
               "victims_identical": results, "tmpfs": tmpfs, "seed": args.seed, "gpus": args.gpus,
               "minutes": round((time.monotonic() - t0) / 60, 1), "events": events}
    (work / "soak.json").write_text(json.dumps(summary, indent=2))
    ok = all(results.values()) and tmpfs.get("resumed_same_as_ref", True)
    print(f"{n} failures survived ({summary['by_mode']}); identical final weights: {all(results.values())}; "
          f"{summary['minutes']} min -> {work / 'soak.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

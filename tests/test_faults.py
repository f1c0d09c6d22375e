"""Reliability through the real CLI and the real `deepspeed` launcher, on a tiny random Llama.

One run is pushed through every kind of failure in turn (a second run on the same folder, a
SIGKILL during an evaluation, a NaN loss, a full disk while saving, a SIGKILL of the whole process
group at a random moment) and resumed with `--resume` after each; it must end with exactly the
weights and metrics of an uninterrupted run, and after every failure no checkpoint folder that
lacks a file may be listed or loaded. A second run skips a NaN step on two ranks. `tests/
test_train_e2e.py` already covers single kills at `step:5` and `save:4`; `bench/fault_soak.py`
repeats all of this many times.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rmkit.checkpoint import META_FILE, list_checkpoints, nonfinite_names, problems, read_meta
from rmkit.data.records import Record, write_records
from rmkit.errors import RmkitError

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def _recipe(tmp: Path, model: Path, out: str, *, max_steps: int = 8, save_every: int = 2, eval_every: int = 3,
            keep_last: int = 2, gpus: int = 1, zero: str = "zero2", on_nonfinite: str = "stop") -> Path:
    data = tmp / "toy.jsonl"
    if not data.exists():
        write_records(data, [Record(f"## Human:\nquestion {i} about item {i % 5}\n\n## Assistant:\n",
                                    (" yes that is right", " no that is wrong"), (1.0, 0.0), "toy", "business")
                             for i in range(16)])
    p = tmp / f"{out}.yaml"
    p.write_text(f"""
stage: grft
model: {{path: "{model}"}}
data:
  train: [{{path: "{data}"}}]
  eval: {{toy: {{path: "{data}", limit: 8}}}}
  max_length: 64
train: {{lr: 5.0e-3, schedule: constant, global_batch: 8, micro_batch: 2, max_steps: {max_steps},
        save_every: {save_every}, eval_every: {eval_every}, keep_last: {keep_last}, seed: 7,
        on_nonfinite: {on_nonfinite}, output_dir: "{tmp / out}"}}
launch: {{deepspeed: {zero}, gpus: {gpus}, precision: fp32}}
""")
    return p


def _env(fault: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RMKIT_FAULT"}
    env.update(PYTHONPATH=str(REPO), COLUMNS="200", PYTHONUNBUFFERED="1", **extra)
    if fault:
        env["RMKIT_FAULT"] = fault
    return env


def rmkit(recipe: Path, *args: str, fault: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmkit", "train", "grft", "--recipe", str(recipe), *args],
                          capture_output=True, text=True, env=_env(fault, **env), timeout=400)


def start(recipe: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """The CLI in its own session, so one killpg reaches it, the launcher and every rank."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "rmkit", "train", "grft", "--recipe", str(recipe), *args],
                                stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), "a process of the killed run survived"


def last_step(run: Path) -> int:
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, AttributeError):
            pass  # a line cut by the kill
    return max(steps)


def check_checkpoints(run: Path) -> list[int]:
    """Every listed checkpoint is whole; every folder that is not whole is unlisted and refused."""
    listed = {d for _, d in list_checkpoints(run)}
    folders = sorted((run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    for d in folders + ([run / "final"] if (run / "final").exists() else []):
        if d in listed or d.name == "final":
            assert problems(d) == [], (d, problems(d))
            files = json.loads((d / META_FILE).read_text())["files"]
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
            assert d.name == "final" or any(name.startswith("state/") for name in files)
            on_disk = {f.relative_to(d).as_posix(): f.stat().st_size for f in d.rglob("*")
                       if f.is_file() and f.name != META_FILE}
            assert on_disk == files
        else:
            assert problems(d), d
            with pytest.raises(RmkitError, match="is not a complete rmkit checkpoint"):
                read_meta(d)
    return sorted(s for s, _ in list_checkpoints(run))


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    for r in rows:
        r.pop("seconds", None)
        r.pop("tokens_per_s", None)
    return rows


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def user_error(res: subprocess.CompletedProcess[str], *messages: str) -> None:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    for m in messages:
        assert m in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def test_every_failure_then_resume_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    rng = random.Random(int(os.environ.get("RMKIT_FAULT_SEED", "1")))
    ref = _recipe(tmp_path, tiny_model_dir, "ref")
    victim = _recipe(tmp_path, tiny_model_dir, "victim")
    run = tmp_path / "victim"
    ckpt = run / "checkpoints"

    # the lock: a second training on a folder in use refuses at once and touches nothing there
    first = start(ref, log=tmp_path / "ref.log")
    lock = tmp_path / "ref" / ".lock"
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None, (tmp_path / "ref.log").read_text()[-3000:]
        time.sleep(0.2)
    second = rmkit(ref)
    user_error(second, f"{tmp_path / 'ref'} is in use by a running training (pid {first.pid})",
               "hint: wait for it to finish")
    assert first.wait(timeout=400) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    # SIGKILL inside the evaluation after step 3: step 2 is the newest checkpoint
    killed = rmkit(victim, fault="eval:3")
    assert killed.returncode != 0 and not (run / "final").exists()
    assert check_checkpoints(run) == [2] and last_step(run) == 2

    # rank 0's loss turns NaN in step 5: stop with the step and the last good checkpoint, exit 2
    nan = rmkit(victim, "--resume", fault="nan:5")
    user_error(nan, "error: non-finite loss at step 5; stopped before writing any weights",
               f"hint: last good checkpoint: {ckpt / 'step-000004'}")
    assert check_checkpoints(run) == [2, 4]

    # the disk is full while step 6 is saved: clear error, no temporary folder, step 4 intact
    full = rmkit(victim, "--resume", fault="enospc:6")
    user_error(full, f"error: could not write checkpoint {ckpt / 'step-000006'}: No space left on device "
                     f"({ckpt / '.tmp-step-000006' / 'model.safetensors'});",
               f"the last good checkpoint is intact: {ckpt / 'step-000004'}")
    assert check_checkpoints(run) == [2, 4] and not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]

    # SIGKILL of the whole process group at a random moment once training has resumed
    proc = start(victim, "--resume", log=tmp_path / "victim.log")
    while last_step(run) < 5 and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 1.5))
    kill_group(proc)
    assert check_checkpoints(run)[-2:] in ([2, 4], [4, 6])
    assert not (run / "final").exists() or (run / "eval_final.json").exists()  # final/ is written last

    # a copy of a complete checkpoint with one file missing is neither listed nor loaded
    broken = ckpt / "step-000001"
    shutil.copytree(ckpt / "step-000004", broken)
    (broken / "tokenizer.json").unlink()
    assert 1 not in check_checkpoints(run)
    with pytest.raises(RmkitError, match="tokenizer.json is missing"):
        read_meta(broken)
    shutil.rmtree(broken)

    done = rmkit(victim, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = _weights(tmp_path / "ref" / "final"), _weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "ref") == _metrics(run)
    assert json.loads((run / "eval_final.json").read_text()) == json.loads((tmp_path / "ref" / "eval_final.json").read_text())


def test_nan_step_skipped_on_every_rank(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two ranks, ZeRO-0 (a plain torch optimizer, guarded by rmkit): rank 0's loss is NaN in step
    3, rank 1's is finite; both drop the whole update, so the weights after step 3 equal those
    after step 2, and the step is logged."""
    recipe = _recipe(tmp_path, tiny_model_dir, "skip", max_steps=4, save_every=1, eval_every=0, keep_last=4,
                     gpus=2, zero="zero0", on_nonfinite="skip")
    res = rmkit(recipe, fault="nan:3", RMKIT_FINGERPRINT="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "skip"
    rows = _metrics(run)
    assert {"step": 3, "skipped": True, "reason": "non-finite loss"} in rows
    assert [r for r in rows if "skipped" in r] == [{"step": 3, "skipped": True, "reason": "non-finite loss"}]
    w2, w3, w4 = (_weights(run / "checkpoints" / "step-000002"), _weights(run / "checkpoints" / "step-000003"),
                  _weights(run / "final"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 changed nothing
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in w4.values())
    assert (run / "fingerprint-rank0.txt").read_text() == (run / "fingerprint-rank1.txt").read_text()


def test_nonfinite_names() -> None:
    count, names = nonfinite_names([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")])),
                                    ("c", torch.tensor([float("inf")])), ("ids", torch.tensor([1, 2])),
                                    ("d", torch.tensor([float("-inf")]))], limit=2)
    assert (count, names) == (3, ["b", "c"])


def test_release_shm_unlinks_only_dead_or_named_launches(tmp_path: Path) -> None:
    import socket

    from rmkit.train.launch import release_shm

    uid = os.getuid()
    with socket.socket() as live:  # a port somebody listens on: a run still going
        live.bind(("127.0.0.1", 0))
        live.listen()
        live_port = live.getsockname()[1]
        names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{live_port}_0",
                 f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{live_port}_1",
                 f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1_0",           # nobody listens on port 1
                 f"deepspeed_allreduce_buffer_{uid}_10.0.0.7_1_0",            # another node's master: not ours to judge
                 f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_1_0",       # another user's
                 "unrelated_file"]
        for n in names:
            (tmp_path / n).write_bytes(b"x")
        assert [p.name for p in release_shm(shm_dir=tmp_path)] == [names[2]]
        assert sorted(p.name for p in release_shm(live_port, shm_dir=tmp_path)) == names[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[3], names[4], names[5]])

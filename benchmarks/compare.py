"""The benchmark users read: scripts/train.py next to a raw PyTorch loop, a minimal accelerate loop and the HF
Trainer (benchmarks/loops.py), on the same model, data, batch, optimizer, schedule and thread count, every
variant in fresh processes, repeats interleaved, medians.

    make bench        # or: .venv/bin/python benchmarks/compare.py [--repeats 5 --launch_repeats 3]

Measures (tiny_lm's model and batch unless said):
- steady-state optimizer steps/s (steps `--warmup`..150, no checkpoint) and peak resident memory, as ratios to raw;
- launch-to-first-step (process start to the first step's log record): a fresh start, and resumed at an in-epoch
  position of 10, 1,000 and 100,000 batches (a 46K-parameter model on 16-token blocks, batch 1: one epoch is
  105,570 batches; each variant's own 10-step checkpoint with its position set to the target, the way each
  records it);
- a 60-step run saving every 10 steps: time a save blocks training (each variant's save call timed: for the
  Trainer its `_save_checkpoint`, for train.py the writer's save as logged at --log_level debug, a wait for the
  previous background write included), bytes per checkpoint / bytes of the model + optimizer tensors; then the
  same run SIGKILLed after step 31 (async: while the step-30 checkpoint is being written) and re-run: are the
  final weights bitwise equal (`torch.equal`) to the uninterrupted run's?

Writes benchmarks/results/compare.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("raw", "accelerate", "trainer", "train.py")
SAVERS = (*VARIANTS, "train.py --async_save")
POSITIONS = (10, 1_000, 100_000)
LONG_TOTAL = 200_000  # train.py's planned run for the launch measures (its schedule; it stops by --max_steps_per_run)
STEADY = ["--config", str(REPO / "configs/tiny_lm.yaml"), "--eval_steps", "0", "--report_to", "none",
          "--max_eval_samples", "8"]  # fmt: skip
LONG = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2", "--vocab_size", "1024", "--block_size", "16",
        "--per_device_train_batch_size", "1", "--report_to", "none", "--eval_steps", "0", "--max_eval_samples", "4",
        "--learning_rate", "0.001", "--seed", "7"]  # fmt: skip


def command(variant: str, flags: list[str], out: Path, cache: Path, max_steps: int, save_every: int) -> list[str]:
    common = [*flags, "--cache_dir", str(cache)]
    if variant.startswith("train.py"):
        extra = ["--async_save"] if "async" in variant else []
        return [sys.executable, str(REPO / "scripts/train.py"), *common, "--output_dir", str(out), "--max_steps",
                str(max_steps), "--checkpointing_steps", str(save_every), *extra]  # fmt: skip
    return [sys.executable, str(REPO / "benchmarks/loops.py"), variant, "--out", str(out), "--max_steps",
            str(max_steps), "--save_every", str(save_every), *common]  # fmt: skip


def run(cmd: list[str], kill_after_step: int | None = None, log: Path | None = None, env: dict | None = None
        ) -> tuple[float, int]:  # fmt: skip
    """(launch time, peak RSS bytes) of `cmd`; with kill_after_step, SIGKILLed once `log` shows that step."""
    with tempfile.TemporaryFile() as err:  # not a pipe: a chatty variant would block on a full one
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env={**os.environ, **(env or {})})
        while kill_after_step is not None and not (steps(log) and steps(log)[-1]["step"] >= kill_after_step):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} ended before step {kill_after_step}")
            time.sleep(0.005)
        if kill_after_step is not None:
            proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if kill_after_step is None and code not in (0, 75):  # 75: stopped by --max_steps_per_run, as asked
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {err.read().decode()[-3000:]}")
    return t0, usage.ru_maxrss * 1024


def steps(log: Path) -> list[dict]:
    """The step records of a train_log.jsonl (a line being written is left out)."""
    records = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in records if "train/loss" in r]


# --- the three measures


def steady(variant: str, root: Path, cache: Path, r: int, warmup: int, n: int = 150) -> tuple[float, int]:
    out = root / f"steady-{variant}-{r}".replace(" ", "")
    _, rss = run(command(variant, STEADY, out, cache, n, 0))
    t = [rec["time"] for rec in steps(out / "train_log.jsonl")]
    return (len(t) - 1 - warmup) / (t[-1] - t[warmup]), rss


def lifecycle(variant: str, root: Path, cache: Path) -> dict:
    """Save cost, checkpoint size and SIGKILL + resume exactness of one variant."""
    whole, killed = (root / f"life-{variant}-{kind}".replace(" ", "") for kind in ("whole", "killed"))
    flags = [*STEADY, "--log_level", "debug"] if variant.startswith("train.py") else STEADY
    run(command(variant, flags, whole, cache, 60, 10))
    cmd = command(variant, STEADY, killed, cache, 60, 10)
    # killed after step 31: --async_save's step-30 write (made 1 s longer) is still in flight
    slow = {"RESUMABLE_DELAY": "async_write:1"} if "async" in variant else {}
    run(cmd, kill_after_step=31, log=killed / "train_log.jsonl", env=slow)
    run(cmd)
    a, b = final_weights(variant, whole), final_weights(variant, killed)
    import torch

    return {
        "blocked_s": statistics.median(blocked(variant, whole)),
        "checkpoint_bytes": checkpoint_bytes(variant, whole, 50),  # one train.py's retention keeps
        "bitwise": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
    }


def blocked(variant: str, out: Path) -> list[float]:
    """Seconds each save kept the loop waiting, as the variant's log says (the loops time their save call;
    scripts/train.py logs it at --log_level debug)."""
    if variant.startswith("train.py"):
        text = (out / "train.log").read_text()
        return [float(x) for x in re.findall(r"training blocked ([0-9.]+) s", text)]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["save_s"] for r in records if "save_s" in r]


def final_weights(variant: str, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if variant.startswith("train.py"):
        return load_file(out / "final" / "model.safetensors")
    tied = {"lm_head.weight"}  # save_pretrained leaves the tied copy out; so do we, to compare like with like
    return {k: v for k, v in torch.load(out / "final.pt").items() if k not in tied}


def checkpoint_path(variant: str, out: Path, step: int) -> Path:
    if variant.startswith("train.py"):
        return out / "checkpoints" / f"step-{step:08d}"
    return out / {"raw": f"ckpt-{step}.pt", "accelerate": f"step_{step}", "trainer": f"checkpoint-{step}"}[variant]


def checkpoint_bytes(variant: str, out: Path, step: int) -> int:
    path = checkpoint_path(variant, out, step)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def state_bytes(out: Path) -> int:
    """Bytes of the model's and AdamW's tensors (each storage once: GPT-2 ties its embeddings)."""
    import torch

    state, seen = torch.load(checkpoint_path("raw", out, 50), weights_only=False), {}
    tensors = [*state["model"].values()] + [v for s in state["optimizer"]["state"].values() for v in s.values()]
    for t in tensors:
        if torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def launch(variant: str, root: Path, cache: Path, r: int) -> dict[str, float]:
    """Seconds from launch to the first step: fresh, and resumed at each of POSITIONS."""
    base = root / f"launch-{variant}-{r}"
    ours = variant == "train.py"
    total = LONG_TOTAL if ours else 10
    extra = ["--max_steps_per_run", "10"] if ours else []
    times = {"fresh": first_step(command(variant, LONG + extra, base, cache, total, 10), base)}
    for position in POSITIONS:
        out = root / f"launch-{variant}-{r}-{position}"
        shutil.copytree(base, out)
        move_position(variant, out, position)
        extra = ["--max_steps_per_run", "1"] if ours else []
        times[f"{position:,}"] = first_step(command(variant, LONG + extra, out, cache, total if ours else position + 1,
                                                    0), out)  # fmt: skip
    return times


def first_step(cmd: list[str], out: Path) -> float:
    before = len(steps(out / "train_log.jsonl"))
    t0, _ = run(cmd)
    return steps(out / "train_log.jsonl")[before]["time"] - t0


def move_position(variant: str, out: Path, position: int) -> None:
    """Make the variant's 10-step checkpoint say `position` batches, in the variant's own bookkeeping."""
    import torch

    src = checkpoint_path(variant, out, 10)
    if variant == "raw":
        state = torch.load(src, weights_only=False)
        state["step"] = position
        torch.save(state, checkpoint_path(variant, out, position))
        if position != 10:
            src.unlink()
    elif variant == "accelerate":
        src.rename(checkpoint_path(variant, out, position))
    elif variant == "trainer":
        dst = checkpoint_path(variant, out, position)
        src.rename(dst)
        state = json.loads((dst / "trainer_state.json").read_text())
        state["global_step"] = position
        (dst / "trainer_state.json").write_text(json.dumps(state))
    else:
        from resumable.manifest import MANIFEST, commit_checkpoint, read_manifest

        fields = {k: v for k, v in read_manifest(src).items()
                  if k not in ("format", "step", "created", "files", "manifest_sha256")}  # fmt: skip
        dst = checkpoint_path(variant, out, position)
        tmp = dst.with_name(f".tmp-{dst.name}")
        src.rename(tmp)
        (tmp / MANIFEST).unlink()
        progress = json.loads((tmp / "progress.json").read_text())
        progress.update(step=position, batches_in_epoch=position, samples_in_epoch=position, samples_seen=position)
        (tmp / "progress.json").write_text(json.dumps(progress))
        commit_checkpoint(tmp, dst, position, fields)


# --- report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="steady-state repeats (interleaved)")
    p.add_argument("--launch_repeats", type=int, default=3, help="launch-to-first-step repeats")
    p.add_argument("--warmup", type=int, default=30, help="steps left out of the steady-state rate")
    p.add_argument("--out", type=Path, default=RESULTS, help="where compare.{md,json,png} go")
    p.add_argument("--only", choices=("steady", "launch", "life"), help="one measure, printed, no report")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 2)))  # the same threads for every variant
    rates: dict = {v: [] for v in VARIANTS}
    rss: dict = {v: [] for v in VARIANTS}
    launches: dict = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        for flags in (STEADY, LONG):  # corpus, tokenizer and tokenized caches built outside every timing
            subprocess.run(command("train.py", flags, root / f"prime-{len(flags)}", cache, 1, 0), check=True,
                           capture_output=True)  # fmt: skip
        for r in range(a.repeats if a.only in (None, "steady") else 0):
            for v in VARIANTS:
                rate, peak = steady(v, root, cache, r, a.warmup)
                rates[v].append(rate)
                rss[v].append(peak)
                print(f"steady  repeat {r} {v:>10}: {rate:6.2f} steps/s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
        for r in range(a.launch_repeats if a.only in (None, "launch") else 0):
            for v in VARIANTS:
                launches[v].append(launch(v, root, cache, r))
                print(f"launch  repeat {r} {v:>10}: " + ", ".join(f"{k} {s:.2f} s" for k, s in launches[v][-1].items()),
                      flush=True)  # fmt: skip
        life = {}
        for v in SAVERS if a.only in (None, "life") else ():
            life[v] = lifecycle(v, root, cache)
            print(f"life    {v:>22}: {life[v]}", flush=True)
        if a.only:
            return
        state = state_bytes(root / "life-raw-whole")
    report(a.out, rates, rss, launches, life, state)


def report(out: Path, rates, rss, launches, life, state: int) -> None:
    from compare_report import write_report

    med = statistics.median
    rows = {}
    for v in SAVERS:
        base = v.split(" ")[0]
        rows[v] = {
            "steps_per_s": med(rates[base]) if v in rates else None,
            "steps_ratio": med(rates[base]) / med(rates["raw"]) if v in rates else None,
            "rss_ratio": med(rss[base]) / med(rss["raw"]) if v in rss else None,
            "launch_s": {k: med(t[k] for t in launches[base]) for k in launches[base][0]} if v in launches else None,
            "blocked_ms": life[v]["blocked_s"] * 1e3,
            "bytes_ratio": life[v]["checkpoint_bytes"] / state,
            "bitwise": life[v]["bitwise"],
        }
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
              f"{os.environ['OMP_NUM_THREADS']}, {time.strftime('%Y-%m-%d')}"  # fmt: skip
    runs = {"rates": rates, "rss": rss, "launches": launches, "life": life, "state_bytes": state}
    write_report(out, rows, machine, runs)


if __name__ == "__main__":
    main()

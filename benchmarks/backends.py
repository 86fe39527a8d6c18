"""DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 on 2 CPU processes, same model, data and flags, through scripts/train.py:
steady-state optimizer steps/s (ratio to DDP), checkpoint bytes per rank, and the time a save adds to its step.

    .venv/bin/python benchmarks/backends.py [--repeats 3] [--steps 60] [--n_layer 2 --n_embd 128]

Each repeat runs the three backends one after another (interleaved), in fresh output dirs. Step times come from
train_log.jsonl's wall-clock stamps: steps/s is 1 / the median step time away from saves and evaluations; save
cost is the median wall time of a save as rank 0 logs it (every rank writes its shard; checkpointing every 10 steps).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"DDP": "cpu_ddp", "ZeRO-2": "deepspeed_zero2", "ZeRO-3": "deepspeed_zero3"}


def run(launch: str, out: Path, cache: Path, a: argparse.Namespace) -> dict:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "accelerate_configs" / f"{launch}.yaml"),
           str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "tiny_lm.yaml"),
           "--config_overrides", f"n_layer={a.n_layer},n_embd={a.n_embd},n_head=4", "--max_steps", str(a.steps),
           "--checkpointing_steps", "10", "--eval_steps", "0", "--keep_best", "0", "--report_to", "none",
           "--log_level", "debug", "--output_dir", str(out), "--cache_dir", str(cache)]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "ACCELERATE_USE_CPU"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/loss" in r}
    delta = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    saved = {s for s in delta if s % 10 == 0}  # steps that ended with a save: not steady state
    plain = statistics.median(d for s, d in delta.items() if s not in saved and (s - 1) not in saved)
    folder = out / "checkpoints" / f"step-{a.steps:08d}"
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    per_rank = [sum(n for f, n in files.items() if f"rank_{r}_" in f or f"_{r}.pkl" in f) for r in (0, 1)]
    shared = sum(files.values()) - sum(per_rank)  # model states / weights, scheduler, progress: written by rank 0
    saves = [float(m) for m in re.findall(r"saved checkpoint step-\d+ in ([\d.]+) s", (out / "train.log").read_text())]
    return {
        "step_s": plain,
        "save_s": statistics.median(saves),
        "rank0_bytes": per_rank[0] + shared,
        "rank1_bytes": per_rank[1],
        "total_bytes": sum(files.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=128)
    a = p.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in BACKENDS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for name, launch in BACKENDS.items():
                results[name].append(run(launch, Path(tmp) / f"{launch}-{i}", Path(tmp) / "cache", a))
    base = statistics.median(r["step_s"] for r in results["DDP"])
    print(f"| backend (2 CPU processes, n_layer={a.n_layer} n_embd={a.n_embd}) | steps/s | vs DDP | save (s) "
          "| checkpoint bytes rank 0 / rank 1 / total |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        save = statistics.median(r["save_s"] for r in rows)
        last = rows[-1]
        print(f"| {name} | {1 / step:.1f} | {base / step:.2f}x | {save:.3f} | "
              f"{last['rank0_bytes'] / 1e6:.1f} MB / {last['rank1_bytes'] / 1e6:.1f} MB / {last['total_bytes'] / 1e6:.1f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()

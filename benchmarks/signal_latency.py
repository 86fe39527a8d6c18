"""Time from a SIGTERM to the training process's exit (checkpoint written), to choose Slurm's --signal lead time.

    .venv/bin/python benchmarks/signal_latency.py --trials 5                # the tiny model
    .venv/bin/python benchmarks/signal_latency.py --trials 3 --gpt2_small   # ~88M parameters

Each trial starts `python scripts/train.py`, waits for a random step, sends SIGTERM to the training process,
and measures until it exits (it finishes the step, saves a regular checkpoint, exits 75).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny_lm.yaml", "--max_eval_samples", "16", "--eval_steps", "0"]
# GPT-2 small's library defaults (12 layers, 768 wide) with the embedded 4096-token vocabulary: ~88M parameters
GPT2_SMALL = [*TINY, "--model_type", "gpt2", "--block_size", "128", "--per_device_train_batch_size", "2"]


def last_step(out: Path) -> int:
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def trial(args: list[str], cache: str, out: Path, at_step: int) -> tuple[float, int, int]:
    cmd = [
        sys.executable,
        "scripts/train.py",
        *args,
        "--cache_dir",
        cache,
        "--output_dir",
        str(out),
        "--report_to",
        "none",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while last_step(out) < at_step:
        if proc.poll() is not None:
            raise SystemExit(f"run ended early: rc={proc.returncode}")
        time.sleep(0.002)
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait()
    return time.perf_counter() - t0, rc, last_step(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--gpt2_small", action="store_true", help="GPT-2 small (~88M) instead of the tiny model")
    a = p.parse_args()
    args = GPT2_SMALL if a.gpt2_small else TINY
    rng = random.Random(0)
    latencies = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.trials):
            at = rng.randint(3, 8)
            dt, rc, stopped = trial(args, os.path.join(tmp, "cache"), Path(tmp) / f"run{i}", at)
            latencies.append(dt)
            print(f"trial {i}: signal after step {at}, stopped at step {stopped}, exit {rc}, {dt:.2f} s", flush=True)
    print(f"signal -> exit: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s over {a.trials}")


if __name__ == "__main__":
    main()

"""Harness overhead: steady-state optimizer steps/s of scripts/train.py vs a raw PyTorch loop, a minimal
accelerate loop and the HF Trainer, on the same model, data, batch, optimizer and thread count, measured in one
run (interleaved repeats).

    .venv/bin/python benchmarks/throughput.py --repeats 3 --steps 150 [--variants raw,accelerate,trainer,harness]

Each variant runs in a fresh process. Steady state = the steps after the first `--warmup` ones, up to the last
(the harness's evaluation and final save come after its last logged step and are not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def common_args(steps: int, cache: str, out: str) -> list[str]:
    # tiny_lm's model and batch; no mid-run eval or checkpoint so only the loop itself is timed
    return ["--config", str(REPO / "configs/tiny_lm.yaml"), "--max_steps", str(steps), "--eval_steps", "0",
            "--checkpointing_steps", "0", "--report_to", "none", "--max_eval_samples", "8",
            "--cache_dir", cache, "--output_dir", out]  # fmt: skip


def steady_rate(times: list[float], warmup: int) -> float:
    """Steps per second between step `warmup` and the last step."""
    return (len(times) - 1 - warmup) / (times[-1] - times[warmup])


# --- workers (run in a fresh process each)


def worker(kind: str, steps: int, cache: str, out: str) -> list[float]:
    import torch
    from transformers import get_scheduler

    from resumable.config import parse_config
    from resumable.data import build_dataloaders, load_raw_datasets, load_tokenizer, tokenize_datasets
    from resumable.modeling import build_model

    cfg = parse_config(common_args(steps, cache, out))
    torch.manual_seed(cfg.seed)
    raw = load_raw_datasets(cfg)
    tok = load_tokenizer(cfg, raw)
    train_ds, val_ds = tokenize_datasets(cfg, raw, tok)
    train_dl, _ = build_dataloaders(cfg, train_ds, val_ds, tok)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, cfg.warmup_steps, steps)
    if kind == "trainer":
        return trainer_times(cfg, model, opt, sched, train_ds, train_dl.collate_fn, steps, out)
    if kind == "accelerate":
        from accelerate import Accelerator

        acc = Accelerator()
        model, opt, train_dl, sched = acc.prepare(model, opt, train_dl, sched)
    model.train()
    times: list[float] = []
    while len(times) < steps:
        for batch in train_dl:
            loss = model(**batch).loss
            if kind == "accelerate":
                acc.backward(loss)
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if len(times) % 10 == 0:
                loss.item()  # what a loop that prints its loss now and then pays
            times.append(time.time())
            if len(times) >= steps:
                break
    return times


def trainer_times(cfg, model, opt, sched, train_ds, collate, steps: int, out: str) -> list[float]:
    """The HF Trainer on the same model, data, collator, optimizer and schedule; a step's time at on_step_end."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.time())

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=cfg.per_device_train_batch_size, max_steps=steps,
        max_grad_norm=cfg.max_grad_norm, logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collate, optimizers=(opt, sched),
                      callbacks=[Clock()])  # fmt: skip
    trainer.train()
    return times


def harness(steps: int, cache: str, out: str) -> list[float]:
    cmd = [sys.executable, str(REPO / "scripts/train.py"), *common_args(steps, cache, out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = (Path(out) / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if "train/loss" in line]
    return [r["time"] for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="raw,accelerate,harness")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.cache, a.out)))
        return
    variants = a.variants.split(",")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        harness(5, cache, os.path.join(tmp, "prime"))  # build corpus, tokenizer and caches outside the timing
        for r in range(a.repeats):
            for v in variants:
                out = os.path.join(tmp, f"{v}-{r}")
                if v == "harness":
                    times = harness(a.steps, cache, out)
                else:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        v,
                        "--steps",
                        str(a.steps),
                        "--cache",
                        cache,
                        "--out",
                        out,
                    ]
                    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    times = json.loads(result.stdout.strip().splitlines()[-1])  # the Trainer prints its logs too
                rates[v].append(steady_rate(times, a.warmup))
                print(f"repeat {r} {v:>10}: {rates[v][-1]:.2f} steps/s", flush=True)
    base = statistics.median(rates["raw"]) if "raw" in rates else None
    print(f"\nsteady-state optimizer steps/s, median of {a.repeats} (steps {a.warmup}..{a.steps})")
    for v, rs in rates.items():
        med = statistics.median(rs)
        ratio = f"{med / base:.3f}x raw" if base else ""
        print(f"  {v:>10}: {med:7.2f}  {ratio}   runs: {', '.join(f'{x:.2f}' for x in rs)}")


if __name__ == "__main__":
    main()

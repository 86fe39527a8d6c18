"""The loops users would otherwise write, each with the checkpoint/resume recipe its documentation gives, on the
model, data, collator, optimizer and schedule scripts/train.py builds from the same flags (benchmarks/compare.py
runs them; one variant per fresh process):

- `raw`: a plain PyTorch loop; `torch.save` of model, optimizer, scheduler and step (PyTorch's "saving and
  loading a general checkpoint" recipe); resume skips the epoch's first batches by iterating over them.
- `accelerate`: a minimal accelerate loop; `save_state` / `load_state` and `skip_first_batches` (accelerate's
  checkpointing example).
- `trainer`: the HF Trainer, `save_steps` and `resume_from_checkpoint=True`.

Every variant appends {"step", "train/loss", "time"} to `{out}/train_log.jsonl` after each optimizer step, before
a save (as scripts/train.py does), and writes its final weights to `{out}/final.pt`.

    python benchmarks/loops.py raw|accelerate|trainer --out DIR --max_steps N [--save_every K] [flags of train.py]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


class StepLog:
    def __init__(self, out: Path):
        self.fh = open(out / "train_log.jsonl", "a")  # noqa: SIM115  (open for the process's life)

    def step(self, step: int, loss=None) -> None:
        value = loss.item() if loss is not None and step % 10 == 0 else None  # a loop printing its loss now and then
        self.fh.write(json.dumps({"step": step, "train/loss": value, "time": round(time.time(), 4)}) + "\n")
        self.fh.flush()

    def save(self, step: int, seconds: float) -> None:
        self.fh.write(json.dumps({"step": step, "save_s": round(seconds, 5)}) + "\n")
        self.fh.flush()


def timed(log: StepLog, save, step_of):
    """`save` that records how long it blocked the loop (in the log, after the step's own record)."""

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        save(*args, **kwargs)
        log.save(step_of(), time.perf_counter() - t0)

    return run


def setup(train_flags: list[str], out: Path, max_steps: int) -> tuple:
    import torch
    from transformers import get_scheduler

    from resumable.config import parse_config
    from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets
    from resumable.modeling import build_model

    cfg = parse_config([*train_flags, "--output_dir", str(out), "--max_steps", str(max_steps)])
    torch.manual_seed(cfg.seed)
    raw = load_raw_datasets(cfg)
    tok = load_tokenizer(cfg, raw)
    train_ds, _ = tokenize_datasets(cfg, raw, tok)
    model = build_model(cfg, tok)
    groups = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]  # as train.py
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate)  # fmt: skip
    sched = get_scheduler(cfg.lr_scheduler_type, opt, cfg.warmup_steps, max_steps)
    return cfg, model, opt, sched, train_ds


def save_final(model, out: Path) -> None:
    import torch

    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "final.pt")


def raw_loop(cfg, model, opt, sched, train_ds, out: Path, max_steps: int, save_every: int) -> None:
    import torch
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    dl = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                    collate_fn=default_data_collator)  # fmt: skip
    step, log = 0, StepLog(out)
    saved = sorted(out.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if saved:
        state = torch.load(saved[-1], weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    model.train()
    while step < max_steps:
        skip = step % len(dl)  # the epoch's batches already trained on are read again and dropped
        for batch in itertools.islice(dl, skip, None):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.step(step, loss)
            if save_every and step % save_every == 0:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": step}  # fmt: skip
                timed(log, torch.save, lambda s=step: s)(state, out / f"ckpt-{step}.pt")
            if step >= max_steps:
                break
    save_final(model, out)


def accelerate_loop(cfg, model, opt, sched, train_ds, out: Path, max_steps: int, save_every: int) -> None:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    dl = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                    collate_fn=default_data_collator)  # fmt: skip
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    step, log = 0, StepLog(out)
    saved = sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if saved:
        acc.load_state(str(saved[-1]))
        step = int(saved[-1].name.split("_")[1])
    model.train()
    while step < max_steps:
        skip = step % len(dl)
        for batch in acc.skip_first_batches(dl, skip) if skip else dl:
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.step(step, loss)
            if save_every and step % save_every == 0:
                timed(log, acc.save_state, lambda s=step: s)(str(out / f"step_{step}"))
            if step >= max_steps:
                break
    save_final(acc.unwrap_model(model), out)


def trainer_loop(cfg, model, opt, sched, train_ds, out: Path, max_steps: int, save_every: int) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    log = StepLog(out)

    class Clock(TrainerCallback):  # on_step_end comes before the Trainer's save of that step
        def on_step_end(self, args, state, control, **kwargs):
            log.step(state.global_step)

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.per_device_train_batch_size, max_steps=max_steps,
        max_grad_norm=cfg.max_grad_norm, logging_steps=10, save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500, eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        seed=cfg.seed, disable_tqdm=True, log_level="error",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=default_data_collator,
                      optimizers=(opt, sched), callbacks=[Clock()])  # fmt: skip
    trainer._save_checkpoint = timed(log, trainer._save_checkpoint, lambda: trainer.state.global_step)
    trainer.train(resume_from_checkpoint=any(out.glob("checkpoint-*")) or None)
    save_final(model, out)


LOOPS = {"raw": raw_loop, "accelerate": accelerate_loop, "trainer": trainer_loop}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=sorted(LOOPS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max_steps", type=int, required=True)
    p.add_argument("--save_every", type=int, default=0)
    a, train_flags = p.parse_known_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg, model, opt, sched, train_ds = setup(train_flags, a.out, a.max_steps)
    LOOPS[a.variant](cfg, model, opt, sched, train_ds, a.out, a.max_steps, a.save_every)


if __name__ == "__main__":
    main()

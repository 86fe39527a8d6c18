"""--streaming: what a resume costs at 10 and at 100,000 batches into the stream, next to the HF Trainer resuming
the same stream; and the steps/s of streaming vs the pre-tokenized path.

    .venv/bin/python benchmarks/stream_resume.py --repeats 3

The stream: the embedded stdlib corpus in 16-token blocks, micro-batches of 1 (so that 100,000 batches fit in one
epoch of it). A checkpoint at a position is made the way each tool makes it: for scripts/train.py, a real 10-step
checkpoint whose `stream_state_0.json` is replaced by the state the feed saves after 100,000 batches (computed by
running the feed itself, without the model) and committed again; for the Trainer, its own 10-step checkpoint with
`global_step` set to the position (the Trainer re-reads and discards that many batches). Resume cost =
launch-to-first-step of the resumed process (its start to the first step's log record), median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
POSITIONS = (10, 100_000)
MODEL = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2", "--vocab_size", "1024", "--block_size", "16",
         "--per_device_train_batch_size", "1", "--report_to", "none", "--eval_steps", "0", "--max_eval_samples", "4",
         "--learning_rate", "0.001", "--seed", "7"]  # fmt: skip


def ours(cache: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts/train.py"), *MODEL, "--streaming", "--cache_dir", cache,
            "--output_dir", out, *extra]  # fmt: skip


def first_step_seconds(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Launch `cmd`, return seconds from launch to the first step record in `log` (train_log.jsonl's "time")."""
    lines_before = len(log.read_text().splitlines()) if log.exists() else 0
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode not in (0, 75):  # 75: stopped by --max_steps_per_run, as asked
        raise RuntimeError(f"{cmd} failed ({done.returncode}): {done.stderr[-2000:]}")
    for line in log.read_text().splitlines()[lines_before:]:
        record = json.loads(line)
        if "train/loss" in record or "loss" in record:
            return record["time"] - t0
    raise RuntimeError(f"no step logged in {log}")


def state_at(cache: str, batches: int) -> dict:
    """The stream_state_0.json scripts/train.py saves after `batches` micro-batches (the feed itself, no model)."""
    from accelerate import Accelerator

    from resumable.config import parse_config
    from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets
    from resumable.feed import StreamFeed
    from resumable.ranks import ranks

    accelerator = Accelerator(cpu=True)
    cfg = parse_config([*MODEL, "--streaming", "--max_steps", "1", "--cache_dir", cache, "--output_dir", "/tmp/x"])
    raw = load_raw_datasets(cfg)
    stream, _ = tokenize_datasets(cfg, raw, load_tokenizer(cfg, raw))
    feed = StreamFeed(accelerator, cfg, stream, ranks(accelerator))
    batches_iter, _ = feed.epoch(type("P", (), {"epoch": 0, "batches_in_epoch": 0})())
    for _ in range(batches):
        next(batches_iter)
    return next(iter(feed.checkpoint_files().values()))


def ours_resume(cache: str, root: Path, repeats: int) -> dict[int, list[float]]:
    from resumable.manifest import MANIFEST, commit_checkpoint, read_manifest

    base = root / "ours-base"
    subprocess.run(ours(cache, str(base), "--max_steps", "200000", "--max_steps_per_run", "10",
                        "--checkpointing_steps", "10"), capture_output=True)  # fmt: skip
    times: dict[int, list[float]] = {p: [] for p in POSITIONS}
    for position in POSITIONS:
        state = state_at(cache, position)
        for r in range(repeats):
            run = root / f"ours-{position}-{r}"
            shutil.copytree(base, run)
            ckpt = run / "checkpoints" / "step-00000010"
            fields = {k: v for k, v in read_manifest(ckpt).items() if k not in ("format", "step", "created", "files",
                                                                                  "manifest_sha256")}  # fmt: skip
            tmp = ckpt.with_name(".tmp-step-00000010")
            shutil.copytree(ckpt, tmp)
            (tmp / MANIFEST).unlink()
            (tmp / "stream_state_0.json").write_text(json.dumps(state))
            commit_checkpoint(tmp, ckpt, 10, fields)
            cmd = ours(cache, str(run), "--max_steps", "200000", "--max_steps_per_run", "1")
            times[position].append(first_step_seconds(cmd, run / "train_log.jsonl"))
    return times


TRAINER = r"""
import json, sys, time
import datasets, torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
tok_dir, train_file, out, max_steps, resume = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(tok_dir)
stream = datasets.load_dataset("json", data_files=train_file, split="train", streaming=True)
def pack(batch):
    ids = [t for x in tok(batch["text"], add_special_tokens=False)["input_ids"] for t in x + [tok.eos_token_id]]
    blocks = [ids[i:i + 16] for i in range(0, len(ids) // 16 * 16, 16)]
    return {"input_ids": blocks, "labels": blocks}
stream = stream.map(pack, batched=True, remove_columns=["text", "path"]).shuffle(seed=7, buffer_size=256)
torch.manual_seed(7)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=16))
class Log(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        with open(f"{out}/train_log.jsonl", "a") as fh:
            fh.write(json.dumps({"step": state.global_step, "loss": 0, "time": time.time()}) + "\n")
args = TrainingArguments(out, max_steps=int(max_steps), per_device_train_batch_size=1, save_steps=10,
                         report_to=[], logging_steps=1000, use_cpu=True, dataloader_num_workers=0)
Trainer(model=model, args=args, train_dataset=stream, callbacks=[Log()]).train(
    resume_from_checkpoint=None if resume == "none" else resume)
"""


def trainer_resume(cache: str, root: Path, repeats: int) -> dict[int, list[float]]:
    from resumable.config import parse_config
    from resumable.corpus import build_lm_corpus
    from resumable.data import bpe_cache_dir, load_raw_datasets

    cfg = parse_config([*MODEL, "--streaming", "--max_steps", "1", "--cache_dir", cache, "--output_dir", "/tmp/x"])
    tok_dir = bpe_cache_dir(cfg, load_raw_datasets(cfg)["train"])
    train_file = str(build_lm_corpus(Path(cache))["train"])
    script = root / "trainer_stream.py"
    script.write_text(TRAINER)
    base = root / "trainer-base"
    base.mkdir()
    subprocess.run([sys.executable, str(script), str(tok_dir), train_file, str(base), "10", "none"], check=True,
                   capture_output=True)  # fmt: skip
    times: dict[int, list[float]] = {p: [] for p in POSITIONS}
    for position in POSITIONS:
        for r in range(repeats):
            run = root / f"trainer-{position}-{r}"
            shutil.copytree(base, run)
            ckpt = run / f"checkpoint-{position}"
            (run / "checkpoint-10").rename(ckpt)
            state = json.loads((ckpt / "trainer_state.json").read_text())
            state["global_step"] = position
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
            cmd = [sys.executable, str(script), str(tok_dir), train_file, str(run), str(position + 1), str(ckpt)]
            times[position].append(first_step_seconds(cmd, run / "train_log.jsonl"))
    return times


def throughput(cache: str, root: Path, repeats: int, steps: int = 300) -> dict[str, list[float]]:
    """Steady-state steps/s of tiny_lm's model and batch, streamed vs pre-tokenized (interleaved repeats)."""
    kinds = {"pre-tokenized": [], "streaming": ["--streaming"],
             "streaming, 1 worker": ["--streaming", "--dataloader_num_workers", "1"]}  # fmt: skip
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(repeats):
        for kind in rates:
            out = root / f"rate-{kind}-{r}"
            cmd = [sys.executable, str(REPO / "scripts/train.py"), "--config", str(REPO / "configs/tiny_lm.yaml"),
                   "--max_steps", str(steps), "--eval_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
                   "--max_eval_samples", "8", "--cache_dir", cache, "--output_dir", str(out)]  # fmt: skip
            subprocess.run([*cmd, *kinds[kind]], check=True, capture_output=True)
            t = [json.loads(line)["time"] for line in (out / "train_log.jsonl").read_text().splitlines()
                 if "train/loss" in line]  # fmt: skip
            rates[kind].append((len(t) - 1 - 20) / (t[-1] - t[20]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_trainer", action="store_true", help="only scripts/train.py (the Trainer takes minutes)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), str(Path(tmp) / "cache")
        results = {"scripts/train.py --streaming": ours_resume(cache, root, args.repeats)}
        if not args.skip_trainer:
            results["HF Trainer (IterableDataset)"] = trainer_resume(cache, root, args.repeats)
        rates = throughput(cache, root, args.repeats)
    print(f"\nlaunch-to-first-step of a resumed run, median of {args.repeats} (seconds)")
    print(f"| variant | at {POSITIONS[0]:,} batches | at {POSITIONS[1]:,} batches | ratio |")
    print("|---|---|---|---|")
    for name, times in results.items():
        a, b = (statistics.median(times[p]) for p in POSITIONS)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    pre = statistics.median(rates["pre-tokenized"])
    print(f"\nsteady-state steps/s, tiny_lm model and batch, median of {args.repeats}: pre-tokenized {pre:.2f}")
    for kind, values in list(rates.items())[1:]:
        print(f"  {kind}: {statistics.median(values):.2f} ({statistics.median(values) / pre:.3f}x)")


if __name__ == "__main__":
    main()

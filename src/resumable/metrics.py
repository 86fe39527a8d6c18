"""Evaluation metrics, the per-step training log, trivial baselines and the loss-curve plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from resumable.seq2seq import generation_for  # noqa: F401 (train.py imports the evaluation's parts from here)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    task: str,
    should_abort: Callable[[], bool],
    generation=None,
) -> dict[str, float] | None:
    """Metrics over the whole validation set, gathered across processes; None if every rank agreed to abort.

    Evaluation draws no random numbers (eval mode, a loader with its own generator, greedy generation), so running
    it or not leaves training bit-for-bit the same. `generation` (seq2seq.py) adds the scores of generated text.
    """
    was_training = model.training
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    try:
        for batch in loader:
            flag = torch.tensor([float(should_abort())], device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() > 0:  # every rank breaks at the same batch
                return None
            out = model(**batch)
            if task in ("causal_lm", "seq2seq"):
                # causal: position t scores token t+1: shift the labels, not the logits (no copy of the biggest tensor)
                labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100) if task == "causal_lm" else batch["labels"]
                logits = out.logits.flatten(0, 1).float()  # a no-op in fp32; one fp32 copy of half logits
                nll = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="none").view_as(labels)
                mask = (labels != -100).float()
                parts.append(accelerator.gather_for_metrics(((nll * mask).sum(1), mask.sum(1))))
            else:
                loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
                parts.append(accelerator.gather_for_metrics((loss, out.logits.argmax(-1), batch["labels"])))
        generated = generation.run(accelerator, model, should_abort) if generation is not None else {}
        if generated is None:
            return None
    finally:
        model.train(was_training)
    cols = [torch.cat(c).cpu() for c in zip(*parts)]
    if task == "seq2seq":
        return {"eval/loss": (cols[0].sum() / cols[1].sum()).item(), **generated}
    if task == "causal_lm":
        loss = (cols[0].sum() / cols[1].sum()).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    return {"eval/loss": cols[0].mean().item(), **classification_scores(cols[2].tolist(), cols[1].tolist())}


def classification_scores(labels: list[int], preds: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    binary = len(set(labels) | set(preds)) <= 2
    p, r, f, _ = precision_recall_fscore_support(
        labels, preds, average="binary" if binary else "macro", zero_division=0
    )
    return {"eval/accuracy": accuracy_score(labels, preds), "eval/precision": p, "eval/recall": r, "eval/f1": f}


def baselines(task: str, train, val, max_tokens: int = 2**26, generate_samples: int = 64) -> dict[str, float]:
    """What a model that learned nothing would score: unigram perplexity, the majority-class F1, or (seq2seq) naming
    the function on the `generate_samples` examples evaluation generates for.

    Token counts are accumulated chunk by chunk (memory: one chunk, not the tokenized corpus), over at most
    `max_tokens` tokens per split, taken from evenly spaced chunks of a larger one."""
    if task == "causal_lm":
        counts, val_counts = token_counts(train, max_tokens), token_counts(val, max_tokens, skip_first=True)
        size = max(len(counts), len(val_counts))
        counts = np.pad(counts, (0, size - len(counts))).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())[: len(val_counts)]
        return {"baseline/unigram_perplexity": math.exp(-float((val_counts * logp).sum() / val_counts.sum()))}
    if task == "seq2seq":
        from resumable.seq2seq import baseline

        return baseline(val, generate_samples)
    labels = train.select_columns(["labels"])[:]["labels"].tolist()
    majority = max(set(labels), key=labels.count)
    val_labels = val.select_columns(["labels"])[:]["labels"].tolist()
    scores = classification_scores(val_labels, [majority] * len(val_labels))
    positive = classification_scores(val_labels, [1] * len(val_labels))  # on balanced data the majority F1 is 0
    return {
        "baseline/majority_f1": scores["eval/f1"],
        "baseline/majority_accuracy": scores["eval/accuracy"],
        "baseline/always_positive_f1": positive["eval/f1"],
    }


def token_counts(ds, max_tokens: int, skip_first: bool = False, chunk: int = 1024) -> np.ndarray:
    """How often each token id occurs in `ds["input_ids"]` (the first of each row left out: it is never scored)."""
    ids = ds.select_columns(["input_ids"]).with_format("numpy")
    starts = range(0, len(ds), chunk)
    row_len = len(ids[0]["input_ids"]) if len(ds) else 1
    keep = max(1, max_tokens // (row_len * chunk))
    if len(starts) > keep:  # evenly spaced chunks: the estimate sees the whole corpus, not its beginning
        starts = [starts[i * len(starts) // keep] for i in range(keep)]
    counts = np.zeros(0, dtype=np.int64)
    for start in starts:
        rows = ids[start : start + chunk]["input_ids"]
        rows = [np.asarray(r)[1:] if skip_first else np.asarray(r) for r in rows]
        part = np.bincount(np.concatenate(rows).astype(np.int64))
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[: len(part)] += part
    return counts


class TrainLog:
    """An append-only JSONL log keyed by optimizer step: `train_log.jsonl` (main process), `samples/rank{R}.jsonl`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int, keep_eval: bool = True) -> None:
        """Forget records past `step` (and its evaluation unless `keep_eval`): work the resumed run is about to redo."""
        if not self.path.exists():
            return

        def kept(record: dict) -> bool:
            return record["step"] < step or (record["step"] == step and (keep_eval or "eval/loss" not in record))

        keep = [line for line in self.read_lines() if kept(json.loads(line))]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def read_lines(self) -> list[str]:
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        return [ln for ln in lines if ln.endswith("\n")]  # a line cut by a kill is dropped

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.read_lines()]

    def append(self, record: dict) -> None:
        """One JSON line; a NaN or inf value (a skipped update's loss) is written as null: JSON has no NaN."""
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean, allow_nan=False) + "\n")


def example_hashes(batch: dict) -> list[str]:
    """A short content hash per training example (padding excluded): which data each step saw, without ids."""
    import hashlib

    ids, mask = batch["input_ids"].cpu(), batch.get("attention_mask")
    rows = [row[m.bool()] if mask is not None else row for row, m in zip(ids, mask.cpu() if mask is not None else ids)]
    return [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in rows]


def plot_loss_curve(log: TrainLog, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = log.records()
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train/loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval/loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Sequence to sequence (T5, BART): tokenized pairs, generated text scored with ROUGE-L and BLEU, a trivial baseline.

Evaluation generates greedily (no sampling: it draws no random numbers, so evaluating or not leaves training
bit-for-bit the same) for the first `--eval_generate_samples` validation examples, each rank a share, and scores
the texts gathered on every rank: rouge-score's ROUGE-L F-measure and sacrebleu's corpus BLEU, both 0-100.
"""

from __future__ import annotations

import math
import re

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from resumable.config import TrainConfig

MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]  # what the loaders see; "source"/"target" stay as text


def tokenize_pairs(
    cfg: TrainConfig, raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, common: dict
) -> dict[str, datasets.Dataset]:
    """Each split tokenized (sources truncated to --max_source_length, targets to --max_target_length), with its
    texts kept as `source` and `target` for scoring and the baseline."""
    src, tgt, prefix = cfg.source_column, cfg.target_column, cfg.source_prefix

    def tokenize(batch):
        enc = tokenizer([prefix + s for s in batch[src]], truncation=True, max_length=cfg.max_source_length)
        targets = tokenizer(text_target=batch[tgt], truncation=True, max_length=cfg.max_target_length)
        return {**enc, "labels": targets["input_ids"], "source": batch[src], "target": batch[tgt]}

    return {
        split: ds.map(tokenize, remove_columns=ds.column_names, desc="tokenize", **common) for split, ds in raw.items()
    }


def scores(predictions: list[str], references: list[str], prefix: str = "eval") -> dict[str, float]:
    """ROUGE-L (mean F-measure) and corpus BLEU of `predictions` against `references`, both 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {
        f"{prefix}/rougeL": 100 * sum(rouge) / max(len(rouge), 1),
        f"{prefix}/bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
    }


def name_words(source: str) -> str:
    """The trivial summary of a function: its name split into words (`read_config` -> "read config")."""
    m = re.search(r"def\s+(\w+)", source)
    if not m:  # not Python: the source's first words (a lead baseline)
        return " ".join(source.split()[:12])
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", m.group(1))
    return " ".join(w for w in name.lower().split("_") if w)


def baseline(val: datasets.Dataset, samples: int) -> dict[str, float]:
    """What naming the function scores on the examples evaluation generates for."""
    rows = val.with_format(None).select(range(min(samples, len(val))))
    return scores([name_words(s) for s in rows["source"]], rows["target"], prefix="baseline/name_words")


class Generation:
    """Greedy generation for the first `samples` validation examples, scored against their targets."""

    def __init__(self, cfg: TrainConfig, val: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, collate):
        self.n = min(cfg.eval_generate_samples, len(val))
        rows = val.select(range(self.n)).with_format(None)
        self.references = rows["target"]
        self.inputs = rows.select_columns(["input_ids", "attention_mask"])
        self.tokenizer, self.collate = tokenizer, collate
        self.batch, self.max_new_tokens = cfg.per_device_eval_batch_size, cfg.generation_max_length

    def run(self, accelerator, model, should_abort) -> dict[str, float] | None:
        """Every rank generates its share (the same number of batches on each: ZeRO-3 generates in lockstep)."""
        from accelerate.utils import gather_object

        world, rank = accelerator.num_processes, accelerator.process_index
        mine = [(rank + i * world) % self.n for i in range(math.ceil(self.n / world))]
        unwrapped = accelerator.unwrap_model(model)
        done: list[tuple[int, str]] = []
        for start in range(0, len(mine), self.batch):
            flag = torch.tensor([float(should_abort())], device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() > 0:  # every rank breaks at the same batch
                return None
            picks = mine[start : start + self.batch]
            batch = self.collate([self.inputs[i] for i in picks])
            with torch.no_grad():
                out = unwrapped.generate(
                    input_ids=batch["input_ids"].to(accelerator.device),
                    attention_mask=batch["attention_mask"].to(accelerator.device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            done += [(i, t.strip()) for i, t in zip(picks, texts)]
        predictions = dict(gather_object(done) if world > 1 else done)
        return scores([predictions[i] for i in range(self.n)], self.references)


def generation_for(cfg: TrainConfig, val: datasets.Dataset, tokenizer, collate) -> Generation | None:
    """The generation evaluation of a seq2seq run; None for the other tasks."""
    return Generation(cfg, val, tokenizer, collate) if cfg.task == "seq2seq" else None

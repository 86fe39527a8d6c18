"""Every hyperparameter, declared once. Precedence: dataclass defaults < `--config file.yaml` < `--flag value`."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from resumable.config_checks import check_config, parse_duration, require  # noqa: F401 (re-exported)
from resumable.errors import UserError

TASKS = ("causal_lm", "sequence_classification")
# transformers schedules driven by the step alone (reduce_lr_on_plateau needs a metric, *_min_lr and
# warmup_stable_decay need extra arguments this loop does not pass)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
RESUME_KEYWORDS = ("auto", "latest", "best", "none")


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    # --- Config file
    config: str | None = _f(None, "YAML file of flag values; command-line flags override it.")
    # --- Task and model
    task: Literal["causal_lm", "sequence_classification", "seq2seq"] = _f("causal_lm", "What to train.")
    model_name_or_path: str | None = _f(None, "Hub id or local dir of a pretrained model to fine-tune.")
    model_type: str | None = _f(None, "Architecture to train from scratch (e.g. gpt2, bert); default: a tiny one.")
    config_overrides: str | None = _f(None, "Model config overrides, e.g. 'n_layer=2,n_embd=128'.")
    tokenizer_name: str | None = _f(None, "Hub id or local dir of a tokenizer; default: the model's, else trained.")
    vocab_size: int = _f(4096, "Vocabulary size of the BPE tokenizer trained on the embedded corpus (tokens).")
    num_labels: int = _f(2, "Number of classes (sequence_classification).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(None, "Override the launch config's precision.")
    deterministic: bool = _f(False, "Deterministic GPU kernels (bitwise-repeatable runs and resumes; slower).")
    # --- Data
    dataset_name: str | None = _f(None, "Hub dataset id (needs network); default: the embedded stdlib corpus.")
    dataset_config_name: str | None = _f(None, "Hub dataset configuration name.")
    train_file: str | None = _f(None, "Training data file (.txt/.csv/.json/.jsonl); streaming: a glob of shards.")
    validation_file: str | None = _f(None, "Validation data file (.txt/.csv/.json/.jsonl).")
    text_column: str = _f("text", "Column holding the text.")
    label_column: str = _f("label", "Column holding the label (sequence_classification).")
    validation_split_percentage: int = _f(5, "Percent of train held out when there is no validation split (percent).")
    block_size: int = _f(128, "Tokens per training block (causal_lm).")
    max_seq_length: int = _f(256, "Truncate inputs to this many tokens (sequence_classification).")
    source_column: str = _f("source", "Column holding the input text (seq2seq).")
    target_column: str = _f("target", "Column holding the text to generate (seq2seq).")
    source_prefix: str = _f("", "Text put before every source, e.g. 'summarize: ' for T5 (seq2seq).")
    max_source_length: int = _f(256, "Truncate sources to this many tokens (seq2seq).")
    max_target_length: int = _f(64, "Truncate targets to this many tokens (seq2seq).")
    generation_max_length: int = _f(64, "Most tokens generated per example in evaluation (seq2seq).")
    eval_generate_samples: int = _f(64, "Validation examples generated and scored (ROUGE-L, BLEU) per evaluation.")
    streaming: bool = _f(False, "Stream the training data, tokenized and packed on the fly (causal_lm; --max_steps).")
    shuffle_buffer: int = _f(256, "Streaming: blocks shuffled together in one window of a stream (1: file order).")
    max_train_samples: int | None = _f(None, "Keep only the first N training examples (after tokenization).")
    max_eval_samples: int | None = _f(None, "Keep only the first N validation examples (after tokenization).")
    preprocessing_num_workers: int | None = _f(None, "Processes for tokenization (datasets .map).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes per training process.")
    cache_dir: str | None = _f(None, "Cache for corpora, tokenizers and tokenized data; default ~/.cache/resumable.")
    # --- Optimization
    learning_rate: float = _f(5e-4, "Peak AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this global norm; 0 disables clipping.")
    lr_scheduler_type: Literal[SCHEDULERS] = _f("linear", "LR schedule over optimizer steps (transformers' names).")
    warmup_steps: int = _f(0, "Linear warmup length (optimizer steps).")
    per_device_train_batch_size: int = _f(8, "Micro-batch size per process (examples).")
    per_device_eval_batch_size: int = _f(8, "Evaluation batch size per process (examples).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _f(1.0, "Epochs to train (ignored when --max_steps > 0).")
    max_steps: int = _f(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    seed: int = _f(42, "Seed for model init, shuffling and dropout.")
    ema_decay: float = _f(0.0, "Exponential moving average of the weights, per optimizer step (0: off; e.g. 0.999).")
    swa_start_epoch: int | None = _f(None, "Stochastic weight averaging: average the weights at the end of every "
                                     "epoch from this one on (epochs count from 0; default: off).")  # fmt: skip
    swa_lr: float | None = _f(None, "With --swa_start_epoch: a constant learning rate from that epoch on.")
    # --- Checkpoints, evaluation, logging
    output_dir: str | None = _f(None, "Where checkpoints, logs and the final model go (required).")
    checkpointing_steps: int = _f(500, "Save every N optimizer steps (0: only at epoch ends and the end).")
    async_save: bool = _f(
        False, "Write checkpoints in the background; training waits only for a CPU copy of the state."
    )
    save_total_limit: int | None = _f(None, "Rolling pool: keep the newest N checkpoints (default: all).")
    keep_epoch_every: int = _f(0, "Epoch pool: keep the epoch-end checkpoint of every k-th epoch; 0: off.")
    keep_best: int = _f(1, "Best pool: keep the k best checkpoints by --metric_for_best_model; 0: off.")
    resume_from_checkpoint: str = _f("auto", "auto | latest | best | none | a checkpoint path.")
    eval_steps: int = _f(500, "Evaluate every N optimizer steps (0: only at the end).")
    metric_for_best_model: str | None = _f(None, "Metric tracked as best, e.g. eval/f1; default eval/loss.")
    greater_is_better: bool | None = _f(None, "Whether a larger metric is better; default: inferred from its name.")
    logging_steps: int = _f(10, "Log to trackers every N optimizer steps.")
    record_samples: bool = _f(False, "Append a hash of every training example to samples/rank{R}.jsonl (audit).")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = _f(
        "tensorboard", "Experiment tracker; all = every installed one."
    )
    project_name: str = _f("resumable", "Tracker project name.")
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "Console and train.log verbosity.")
    nan_policy: Literal["stop", "skip_step"] = _f(
        "stop", "A non-finite loss or gradient norm: stop, or skip the update."
    )
    max_nan_skips: int = _f(5, "With skip_step: stop after this many skipped updates in a row (optimizer steps).")
    # --- Preemption and budgets
    max_run_time: str | None = _f(None, "Wall-clock budget for this run, e.g. 3h50m or 7200 (seconds).")
    max_steps_per_run: int = _f(0, "Stop (checkpoint, exit 'run me again') after N steps in this run; 0: off.")
    stop_signals: str = _f("SIGTERM,SIGUSR1,SIGINT", "Signals that checkpoint and stop the run.")
    ddp_timeout: int = _f(1800, "Seconds a collective waits for the slowest rank before the job fails (NCCL: 600).")

    def __post_init__(self) -> None:
        check_config(self)  # every flag's bounds and combinations, one line naming the flag

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The columns holding text: the tokenizer is trained on them, and a row without one is dropped."""
        return (self.source_column, self.target_column) if self.task == "seq2seq" else (self.text_column,)

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def resume_settings(self) -> dict[str, Any]:
        """What a checkpoint must have been trained with to be resumed: model, task, tokenizer, data, seed."""
        keys = ("task", "model_name_or_path", "model_type", "config_overrides", "tokenizer_name", "vocab_size",
                "num_labels", "dataset_name", "dataset_config_name", "train_file", "validation_file", "text_column",
                "label_column", "validation_split_percentage", "block_size", "max_seq_length", "max_train_samples",
                "seed")  # fmt: skip
        if self.task == "seq2seq":  # only then: the settings recorded by other tasks' checkpoints stay equal
            keys += ("source_column", "target_column", "source_prefix", "max_source_length", "max_target_length")
        if self.ema_decay:  # recorded only when on: checkpoints of runs without it keep their settings
            keys += ("ema_decay",)
        if self.swa_start_epoch is not None:
            keys += ("swa_start_epoch", "swa_lr")
        if self.streaming:  # the streams' order depends on both
            keys += ("streaming", "shuffle_buffer", "dataloader_num_workers")
        return {k: getattr(self, k) for k in keys}


# --- parsing


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written (usage examples, exit codes), each flag's default after its doc."""


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print usage + exit; we want one line
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # drop the --dash-alias HF adds
        raise UserError(" ".join(message.split()))  # a value with a line break must not break the one line


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _unknown(name: str, where: str) -> UserError:
    close = difflib.get_close_matches(name, field_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"{where}: unknown key {name!r}{hint}")


def _yaml_flags(path: str) -> list[str]:
    p = Path(path)
    require(p.is_file(), f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: invalid YAML ({str(err).splitlines()[0]})") from None
    require(isinstance(data, dict), f"--config {path}: expected a mapping of flag: value")
    flags: list[str] = []
    for key, value in data.items():
        if key not in field_names() or key == "config":
            raise _unknown(str(key), f"--config {path}")
        if value is None:
            continue
        require(not isinstance(value, (list, dict)), f"--config {path}: key {key!r} must be a scalar")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        flags.append(f"--{key}={text}")  # one token: a value such as -1e+16 is never read as another flag
    return flags


def _peek_config(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            require(i + 1 < len(argv), "--config needs a file")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Parse defaults < --config YAML < flags into a validated `TrainConfig`; raise `UserError` on any mistake.
    `description` (the script's docstring) heads `--help`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(  # allow_abbrev off: --learning must not silently mean --learning_rate
        TrainConfig, allow_abbrev=False, description=description, formatter_class=_HelpFormatter
    )
    config_path = _peek_config(argv)
    yaml_flags = _yaml_flags(config_path) if config_path else []
    if yaml_flags:  # type-check the file's values alone first, so errors name the file
        try:
            parser.parse_known_args(yaml_flags)
        except UserError as err:
            raise UserError(f"--config {config_path}: {err}") from None
    cfg, remaining = parser.parse_args_into_dataclasses(args=yaml_flags + argv, return_remaining_strings=True)
    if remaining:
        if not remaining[0].startswith("-") and Path(remaining[0]).exists():  # `--train_file dir/*.jsonl` unquoted
            raise UserError(f"unexpected value {remaining[0]!r}: a flag takes one path (a glob the shell expanded?); "
                            "quote it: --train_file 'shards/train-*.jsonl'")  # fmt: skip
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=", 1)[0]
        if name in field_names():
            raise UserError(f"unexpected value {remaining[0]!r}")
        raise _unknown(name, "command line")
    return cfg


def cache_root(cfg: TrainConfig | None = None) -> Path:
    """Where corpora, tokenizers, tokenized datasets and remote staging folders are cached."""
    root = (cfg and cfg.cache_dir) or os.environ.get("RESUMABLE_CACHE") or Path.home() / ".cache" / "resumable"
    return Path(root).expanduser()


if __name__ == "__main__":  # python -m resumable.config [README.md | --get FIELD TRAIN_FLAGS...]
    if sys.argv[1:2] == ["--get"]:  # e.g. the Slurm scripts asking for the output_dir a command line resolves to
        try:
            print(getattr(parse_config(sys.argv[3:]), sys.argv[2]))
        except (UserError, AttributeError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    elif len(sys.argv) > 1:
        from resumable.flag_docs import update_readme

        update_readme(Path(sys.argv[1]))
    else:
        from resumable.flag_docs import flags_markdown

        print(flags_markdown(), end="")

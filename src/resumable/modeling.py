"""Models: a pretrained one (`--model_name_or_path`) or an architecture from config, trained from scratch."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from resumable.config import TrainConfig
from resumable.errors import UserError

# The embedded default: small enough to learn the stdlib corpus on 2 CPU cores in minutes.
TINY = {
    "causal_lm": ("gpt2", {"n_layer": 2, "n_head": 4, "n_embd": 128}),
    "sequence_classification": (
        "bert",
        {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 128, "intermediate_size": 256},
    ),
    "seq2seq": ("t5", {"num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_model": 128, "d_kv": 32,
                       "d_ff": 256, "dropout_rate": 0.1}),
}  # fmt: skip
AUTO_MODEL = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}
POSITION_FIELDS = ("n_positions", "max_position_embeddings")
# RoBERTa-style position ids start after the padding index, so `pad_token_id + 1` of the table is never usable
# (roberta-base: 514 positions, 512 tokens).
PADDING_OFFSET_TYPES = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "roberta-prelayernorm", "data2vec-text",
    "xmod", "ibert",
}  # fmt: skip


def model_positions(config: PretrainedConfig) -> int | None:
    """How many tokens one sequence may have in a model of `config` (None: no fixed limit, e.g. T5)."""
    table = next((getattr(config, n) for n in POSITION_FIELDS if getattr(config, n, None)), None)
    if table is None:
        return None
    if config.model_type in PADDING_OFFSET_TYPES:
        return table - ((config.pad_token_id if config.pad_token_id is not None else 1) + 1)
    return table


def _needed_length(cfg: TrainConfig) -> tuple[str, int]:
    if cfg.task == "seq2seq":  # the target side is never longer here than a source may be
        return "--max_source_length", max(cfg.max_source_length, cfg.max_target_length, cfg.generation_max_length)
    return ("--block_size", cfg.block_size) if cfg.task == "causal_lm" else ("--max_seq_length", cfg.max_seq_length)


def _architecture_config(cfg: TrainConfig) -> PretrainedConfig:
    """The model's config before the tokenizer is known: what `--block_size`/`--max_seq_length` are checked against."""
    extra = {"num_labels": cfg.num_labels} if cfg.task == "sequence_classification" else {}
    if cfg.model_name_or_path:
        try:
            config = AutoConfig.from_pretrained(cfg.model_name_or_path, **extra)
        except (OSError, ValueError) as err:  # offline without a cached copy, a folder without config.json, ...
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"--model_name_or_path {cfg.model_name_or_path}: cannot load its config ({reason})"
            ) from None
    else:
        default_type, tiny = TINY[cfg.task]
        model_type = cfg.model_type or default_type
        sizes = tiny if cfg.model_type is None else {}  # an explicit --model_type gets its library defaults
        try:
            config = AutoConfig.for_model(model_type, **sizes, **extra)
        except ValueError:
            raise UserError(f"--model_type {model_type!r}: unknown architecture") from None
        # from scratch, the position table is sized to the training length (even, for kernels that like it)
        _, positions = _needed_length(cfg)
        table = max(positions, 2 * ((positions + 1) // 2))
        if config.model_type in PADDING_OFFSET_TYPES:
            table += (config.pad_token_id if config.pad_token_id is not None else 1) + 1
        for name in POSITION_FIELDS:
            if hasattr(config, name):
                setattr(config, name, table)
    return config


def _apply_overrides(cfg: TrainConfig, config: PretrainedConfig) -> None:
    if cfg.config_overrides:
        try:
            config.update_from_string(cfg.config_overrides)
        except ValueError as err:
            raise UserError(f"--config_overrides {cfg.config_overrides!r}: {err}") from None


def check_model_limits(cfg: TrainConfig) -> None:
    """Refuse a `--block_size`/`--max_seq_length` the model cannot take, before anything is written or loaded.

    Reads only the model's config (`AutoConfig.from_pretrained`, no weights) or builds the from-scratch one with
    `--config_overrides` applied, so it costs well under a second. Also catches an unknown `--model_type`, bad
    `--config_overrides` and a pretrained model that cannot be found.
    """
    config = _architecture_config(cfg)
    _apply_overrides(cfg, config)
    _check_length(cfg, config)


def _check_length(cfg: TrainConfig, config: PretrainedConfig) -> None:
    flag, need = _needed_length(cfg)
    limit = model_positions(config)
    if limit is not None and need > limit:
        model = cfg.model_name_or_path or f"the {config.model_type} model (--config_overrides)"
        raise UserError(f"{flag} {need} exceeds the {limit} positions of {model}; use {flag} {limit} or less")


def build_model_config(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None = None
) -> PretrainedConfig:
    """The model's config; `label_names` (classification) become its `id2label`/`label2id`, which pipelines print."""
    config = _architecture_config(cfg)
    if not cfg.model_name_or_path:
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if cfg.task == "seq2seq":  # T5's convention: the decoder starts from the pad token
            config.decoder_start_token_id = tokenizer.pad_token_id
    config.pad_token_id = tokenizer.pad_token_id
    _apply_overrides(cfg, config)
    if cfg.task == "sequence_classification" and label_names:
        names = [str(n) for n in label_names] + [f"LABEL_{i}" for i in range(len(label_names), cfg.num_labels)]
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    return config


def build_model(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None = None
) -> torch.nn.Module:
    """Build (or load) the model; call after `set_seed` so initialisation is reproducible."""
    config = build_model_config(cfg, tokenizer, label_names)
    _check_length(cfg, config)  # before loading weights; `check_model_limits` has normally said so at start
    auto = AUTO_MODEL[cfg.task]
    if cfg.model_name_or_path:
        model = auto.from_pretrained(cfg.model_name_or_path, config=config)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = auto.from_config(config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model

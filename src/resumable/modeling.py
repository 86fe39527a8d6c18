"""Models: a pretrained one (`--model_name_or_path`) or an architecture from config, trained from scratch."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
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
}
AUTO_MODEL = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}


def build_model_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    extra = {"num_labels": cfg.num_labels} if cfg.task == "sequence_classification" else {}
    if cfg.model_name_or_path:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, **extra)
    else:
        default_type, tiny = TINY[cfg.task]
        model_type = cfg.model_type or default_type
        sizes = tiny if cfg.model_type is None else {}  # an explicit --model_type gets its library defaults
        try:
            config = AutoConfig.for_model(model_type, **sizes, **extra)
        except ValueError:
            raise UserError(f"--model_type {model_type!r}: unknown architecture") from None
        positions = cfg.block_size if cfg.task == "causal_lm" else cfg.max_seq_length
        for name in ("n_positions", "max_position_embeddings"):
            if hasattr(config, name):
                setattr(config, name, max(positions, 2 * ((positions + 1) // 2)))
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if cfg.config_overrides:
        try:
            config.update_from_string(cfg.config_overrides)
        except ValueError as err:
            raise UserError(f"--config_overrides {cfg.config_overrides!r}: {err}") from None
    return config


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """Build (or load) the model; call after `set_seed` so initialisation is reproducible."""
    config = build_model_config(cfg, tokenizer)
    auto = AUTO_MODEL[cfg.task]
    if cfg.model_name_or_path:
        model = auto.from_pretrained(cfg.model_name_or_path, config=config)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = auto.from_config(config)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    need = cfg.block_size if cfg.task == "causal_lm" else cfg.max_seq_length
    if limit is not None and need > limit:
        flag = "--block_size" if cfg.task == "causal_lm" else "--max_seq_length"
        raise UserError(f"{flag} {need} exceeds the model's {limit} positions")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model

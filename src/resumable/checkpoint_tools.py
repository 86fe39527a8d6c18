"""A checkpoint exported as a `save_pretrained` model (`checkpoints.py export`; what inspect prints: inspection.py).

Export rebuilds the model config from the run's `final/config.json` if there is one, else from the settings the
manifest records, and needs the run's tokenizer (final/, the name in the settings, the BPE cache, or --tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from resumable.checkpoint import newer_format, read_manifest, verify_checkpoint
from resumable.errors import UserError

if TYPE_CHECKING:  # config pulls in transformers: not needed to list or verify
    from resumable.config import TrainConfig

from resumable.inspection import WEIGHTS

UNUSABLE_EXIT_CODE = 1  # checkpoints.py: 1 = a checkpoint is corrupted or unloadable (2 stays "bad input")


class CheckpointUnusable(UserError):
    """The checkpoint itself is the problem (corrupted, unloadable, a newer format): one line, exit 1."""

    exit_code = UNUSABLE_EXIT_CODE


def refuse_newer_format(folder: Path) -> None:
    problem = newer_format(folder)
    if problem is not None:
        raise CheckpointUnusable(f"{folder}: {problem}")


DATA_SETTINGS = ("train_file", "validation_file")  # validated on parse, yet irrelevant to the model config


# --- export


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding `checkpoint` in the standard layout, else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def settings_config(settings: dict, output_dir: Path, cache_dir: str | None, with_data: bool) -> TrainConfig:
    """A TrainConfig from the manifest's recorded settings (unknown keys from other versions are dropped)."""
    from resumable.config import field_names, parse_config

    argv = ["--output_dir", str(output_dir)] + (["--cache_dir", cache_dir] if cache_dir else [])
    for key, value in settings.items():
        if value is None or key not in field_names() or (key in DATA_SETTINGS and not with_data):
            continue
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    if settings.get("streaming"):  # a streamed run's length is no recorded setting, yet its flags need one
        argv += ["--max_steps", "1"]
    try:
        return parse_config(argv)
    except UserError as err:
        raise UserError(f"the checkpoint's recorded settings no longer parse: {err}") from None


def find_tokenizer(checkpoint: Path, settings: dict, tokenizer_dir: str | None, cache_dir: str | None):
    """The run's tokenizer: --tokenizer, final/, the pretrained name in the settings, or the cached trained BPE."""
    from transformers import AutoTokenizer

    run_dir = run_dir_of(checkpoint)
    hint = "; pass --tokenizer DIR (a folder with the run's tokenizer files)"
    if tokenizer_dir:
        if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            raise UserError(f"--tokenizer {tokenizer_dir}: no tokenizer_config.json there")
        path = tokenizer_dir
    elif run_dir and (run_dir / "final" / "tokenizer_config.json").is_file():
        path = str(run_dir / "final")
    elif settings.get("tokenizer_name") or settings.get("model_name_or_path"):
        path = settings.get("tokenizer_name") or settings["model_name_or_path"]
    elif settings:
        path = str(_cached_bpe(checkpoint, settings, cache_dir, hint))
    else:
        raise UserError(f"{checkpoint}: the manifest records no settings and the run has no final/ tokenizer{hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"tokenizer {path}: could not be loaded ({str(err).splitlines()[0]}){hint}") from None
    if tokenizer.pad_token is None:  # as resumable.data.load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cached_bpe(checkpoint: Path, settings: dict, cache_dir: str | None, hint: str) -> Path:
    """The BPE tokenizer training built for this data, found in the cache (never retrained: it must be the same)."""
    from resumable.config import cache_root

    cfg = settings_config(settings, run_dir_of(checkpoint) or checkpoint, cache_dir, with_data=True)
    tokenizers = cache_root(cfg) / "tokenizers"
    if not tokenizers.is_dir():  # checked before loading data, which would build a corpus into a wrong cache
        raise UserError(f"no tokenizer cache at {tokenizers} (set --cache_dir to the training's cache){hint}")
    from resumable.data import bpe_cache_dir, load_raw_datasets

    target = bpe_cache_dir(cfg, load_raw_datasets(cfg)["train"])
    if not (target / "tokenizer.json").is_file():
        raise UserError(f"the run's tokenizer is not in the cache {tokenizers} (looked for {target.name}/){hint}")
    return target


def rebuild_model(checkpoint: Path, tokenizer, settings: dict, cache_dir: str | None) -> torch.nn.Module:
    """An untrained model of the checkpoint's architecture: config from final/config.json, else from the settings."""
    from transformers import AutoConfig

    from resumable.modeling import AUTO_MODEL, build_model_config

    run_dir = run_dir_of(checkpoint)
    if run_dir and (run_dir / "final" / "config.json").is_file():
        config = AutoConfig.from_pretrained(run_dir / "final")
    elif settings:
        cfg = settings_config(settings, run_dir or checkpoint, cache_dir, with_data=False)
        config = build_model_config(cfg, tokenizer)
        if cfg.model_name_or_path and config.vocab_size < len(tokenizer):  # build_model resized the embeddings
            config.vocab_size = len(tokenizer)
    else:
        raise UserError(f"{checkpoint}: the manifest records no settings and the run has no final/config.json")
    arch = (getattr(config, "architectures", None) or [""])[0]
    task = settings.get("task") or ("sequence_classification" if "SequenceClassification" in arch else "causal_lm")
    return AUTO_MODEL[task].from_config(config)


def checkpoint_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The model weights a verified checkpoint holds, and the file they came from. A DeepSpeed checkpoint keeps
    them in per-rank shards (`pytorch_model/`): DeepSpeed's own consolidation gives the fp32 master weights."""
    if (checkpoint / "pytorch_model").is_dir():
        import contextlib
        import io

        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(
                f"{checkpoint} holds DeepSpeed shards; reading them needs DeepSpeed: pip install -e '.[deepspeed]'"
            ) from None
        from resumable.backend import refuse_unsafe_pickles

        refuse_unsafe_pickles(checkpoint)

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per shard it reads
            weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
        return dict(weights), checkpoint / "pytorch_model"
    from safetensors.torch import load_file

    return load_file(str(checkpoint / WEIGHTS)), checkpoint / WEIGHTS


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load `weights` (read from `path`) into `model`; only weights tied to a loaded one may be missing (accelerate
    and DeepSpeed drop them)."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        raise CheckpointUnusable(
            f"{path}: does not fit the rebuilt model ({str(err).splitlines()[-1].strip()})"
        ) from None
    own = model.state_dict()  # tied weights appear under both names, sharing storage
    loaded = {t.data_ptr() for name, t in own.items() if name in weights}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointUnusable(
            f"{path}: does not match the rebuilt model (missing: {', '.join(missing[:5]) or '-'}; "
            f"unexpected: {', '.join(result.unexpected_keys[:5]) or '-'})"
        )
    model.tie_weights()


def check_export_target(target: Path, checkpoint: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"--to {target}: exists and is not a directory")
    if target.resolve() in (checkpoint.resolve(), *checkpoint.resolve().parents):
        raise UserError(f"--to {target}: would replace the checkpoint it exports (or a folder holding it)")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(f"--to {target}: exists and is not empty; pass --force to replace it")


def export_checkpoint(
    checkpoint: Path,
    target: Path,
    tokenizer_dir: str | None = None,
    cache_dir: str | None = None,
    force: bool = False,
    weights: str | None = None,
) -> str:
    """Write `checkpoint`'s weights as a `save_pretrained` model + tokenizer in `target` (atomically). `weights`:
    "ema" or "swa" (its weight average), "raw", or None (the average if it has one). Returns which were written."""
    from resumable.export import save_pretrained_atomically

    check_export_target(target, checkpoint, force)
    refuse_newer_format(checkpoint)
    reason = verify_checkpoint(checkpoint, deep=True)
    if reason is not None:
        raise CheckpointUnusable(f"{checkpoint}: not a valid checkpoint ({reason})")
    settings = read_manifest(checkpoint).get("settings") or {}
    tokenizer = find_tokenizer(checkpoint, settings, tokenizer_dir, cache_dir)
    model = rebuild_model(checkpoint, tokenizer, settings, cache_dir)
    load_weights(model, *checkpoint_weights(checkpoint))  # after the verification: DeepSpeed's files are pickles
    kind = weights or next((k for k in ("ema", "swa") if _average_updates(checkpoint / f"{k}.safetensors")), "raw")
    if kind != "raw":
        _apply_average(model, checkpoint / f"{kind}.safetensors", kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained_atomically(model, tokenizer, target)
    return kind


def _average_updates(path: Path) -> int:
    """How many updates the weight average in `path` has had (0 when there is none, or nothing averaged yet)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return int((fh.metadata() or {}).get("updates", 0))


def _apply_average(model: torch.nn.Module, path: Path, kind: str) -> None:
    """The averaged weights copied into the model's parameters (a tied parameter gets them under both names)."""
    from resumable.averaging import FLAGS

    if not path.is_file():
        raise UserError(f"--weights {kind}: {path.parent} holds no {kind} weight average (trained without "
                        f"{FLAGS[kind]})")  # fmt: skip
    if not _average_updates(path):
        raise UserError(f"--weights {kind}: {path.parent} has averaged nothing yet; export --weights raw")
    from safetensors.torch import load_file

    average, params = load_file(str(path)), dict(model.named_parameters())
    if sorted(average) != sorted(n for n, p in params.items() if p.requires_grad):
        raise CheckpointUnusable(f"{path}: holds other parameters than the rebuilt model's")
    with torch.no_grad():
        for name, tensor in average.items():
            params[name].copy_(tensor)

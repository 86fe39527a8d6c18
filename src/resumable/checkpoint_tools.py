"""Read-only views of one checkpoint (`checkpoints.py inspect`) and its export as a `save_pretrained` model.

Loading rules: tensors come from safetensors; optimizer.bin and scheduler.bin only through
`torch.load(..., weights_only=True)`, which refuses any pickled code; random_states_*.pkl are never opened.
Export rebuilds the model config from the run's `final/config.json` if there is one, else from the settings the
manifest records, and needs the run's tokenizer (final/, the name in the settings, the BPE cache, or --tokenizer).
"""

from __future__ import annotations

import json
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from resumable.checkpoint import MANIFEST, PROGRESS, newer_format, read_manifest, verify_checkpoint
from resumable.errors import UserError

if TYPE_CHECKING:  # config pulls in transformers: not needed to list or verify
    from resumable.config import TrainConfig

WEIGHTS, OPTIMIZER, SCHEDULER = "model.safetensors", "optimizer.bin", "scheduler.bin"
UNUSABLE_EXIT_CODE = 1  # checkpoints.py: 1 = a checkpoint is corrupted or unloadable (2 stays "bad input")


class CheckpointUnusable(UserError):
    """The checkpoint itself is the problem (corrupted, unloadable, a newer format): one line, exit 1."""

    exit_code = UNUSABLE_EXIT_CODE


def refuse_newer_format(folder: Path) -> None:
    problem = newer_format(folder)
    if problem is not None:
        raise CheckpointUnusable(f"{folder}: {problem}")


DATA_SETTINGS = ("train_file", "validation_file")  # validated on parse, yet irrelevant to the model config


# --- inspect


def human(n: float) -> str:
    """A byte count for people: 386.1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def weights_summary(path: Path) -> list[str]:
    """Name, shape and dtype of every tensor in a safetensors file, read from its header only (no tensor data)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        names = fh.keys()  # a safe_open handle is not iterable
        slices = [(name, fh.get_slice(name)) for name in names]
        total = sum(math.prod(sl.get_shape()) for _, sl in slices)
        table = [(name, str(tuple(sl.get_shape())), sl.get_dtype()) for name, sl in slices]
    width = [max((len(row[i]) for row in table), default=0) for i in (0, 1)]
    lines = [f"{len(table)} tensors, {total:,} values"]
    return lines + [f"{name.ljust(width[0])}  {shape.ljust(width[1])}  {dtype}" for name, shape, dtype in table]


def load_safely(path: Path) -> Any:
    """torch.load that refuses pickled code; mmap so a multi-GB optimizer state is not read just to summarise it."""
    with warnings.catch_warnings():  # torch warns about pickle protocols of planted files: the error says enough
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # mmap needs the zip format: retry plainly, so the error reported is the real one
            pass
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own message suggests the unsafe load: never repeat that advice
            raise UserError(f"{path}: refused: it holds objects other than tensors and plain data") from None
        except Exception as err:
            raise UserError(f"{path}: could not be loaded ({str(err).strip().splitlines()[0]})") from None


def optimizer_summary(path: Path) -> list[str]:
    """Param groups' hyperparameters, the number of per-parameter states and the step they record."""
    state, lines = load_safely(path), []
    for i, group in enumerate(state.get("param_groups", [])):
        hyper = {k: v for k, v in group.items() if k != "params" and v is not None and v is not False}
        lines.append(f"group {i}: {len(group.get('params', []))} params, " + _pairs(hyper))
    entries = state.get("state", {})
    steps = {float(s["step"]) for s in entries.values() if isinstance(s, dict) and "step" in s}
    step = ", ".join(f"{s:g}" for s in sorted(steps)) or "-"
    lines.append(f"state: {len(entries)} entries, step {step}")
    return lines


def scheduler_summary(path: Path) -> list[str]:
    state = load_safely(path)
    last_lr = state.get("_last_lr")
    lines = [f"last_epoch {state.get('last_epoch')} (scheduler steps taken), last lr {_fmt(last_lr)}"]
    if "base_lrs" in state:
        lines.append(f"base lrs {_fmt(state['base_lrs'])}")
    return lines


def manifest_summary(path: Path) -> list[str]:
    manifest = json.loads(path.read_text())
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.get("created", 0)))
    keys = ("step", "epoch", "epochs_done", "samples_seen", "world_size", "layout", "per_device_train_batch_size",
            "gradient_accumulation_steps")  # fmt: skip
    lines = [_pairs({k: manifest.get(k) for k in keys}), f"created {created}"]
    if manifest.get("metrics"):
        lines.append(f"metrics at step {manifest.get('metrics_step')}: {_pairs(manifest['metrics'])}")
    lines.append(f"versions: {_pairs(manifest.get('versions', {}))}")
    settings = {k: v for k, v in manifest.get("settings", {}).items() if v is not None}
    lines.append(f"settings: {_pairs(settings)}" if settings else "settings: (not recorded)")
    return lines


def progress_summary(path: Path) -> list[str]:
    return [_pairs(json.loads(path.read_text()))]


# file name -> summary lines; files not named here (random_states_*.pkl: pickles) are never opened
SUMMARIES = {
    MANIFEST: manifest_summary,
    PROGRESS: progress_summary,
    WEIGHTS: weights_summary,
    OPTIMIZER: optimizer_summary,
    SCHEDULER: scheduler_summary,
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in mapping.items())


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
    checkpoint: Path, target: Path, tokenizer_dir: str | None = None, cache_dir: str | None = None, force: bool = False
) -> None:
    """Write `checkpoint`'s weights as a `save_pretrained` model + tokenizer in `target` (atomically)."""
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
    target.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained_atomically(model, tokenizer, target)

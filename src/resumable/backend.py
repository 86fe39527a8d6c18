"""What differs between backends, in one place: one process / DDP, DeepSpeed ZeRO, FSDP.

The loop calls the same few things whatever the launch config: `micro_step` + `backward` per micro-batch,
`clip_gradients` and `step` per optimizer update, `gather_weights` at the end. Here is what each means:
- DDP (and one process): accelerate's own calls; `no_sync` keeps all-reduces to the window's last micro-batch.
- DeepSpeed: the engine is driven directly. accelerate's `backward` would run `engine.step()` on every micro-batch
  our loop does not mark (its `sync_gradients` is always true without `accelerator.accumulate`) and divides the
  loss by DeepSpeed's own accumulation count; here the loop marks the window's last micro-batch as the boundary,
  scales the loss by the window's real size itself (the epoch's short last window too) and steps the engine only
  after every rank agreed the update may happen. Clipping to --max_grad_norm happens inside DeepSpeed's step.
  The scheduler, prepared apart from the model, is registered so that `save_state` keeps it (accelerate saves
  only the schedulers it wrapped together with the engine).
- FSDP: accelerate's calls; GPUs only (refused on CPU before any work), the final model gathered from shards.
The checkpoint records which layout it holds (`layout`): sharded states resume only on the same backend and the
same number of processes, refused in one line otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch

from resumable.errors import UserError

DEEPSPEED_ENV, FSDP_ENV = "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"  # set by `accelerate launch`


def launched_backend() -> str:
    """The backend `accelerate launch` asked for: deepspeed, fsdp or ddp (one process and DDP alike)."""
    if os.environ.get(DEEPSPEED_ENV, "").lower() == "true":
        return "deepspeed"
    if os.environ.get(FSDP_ENV, "").lower() == "true":
        return "fsdp"
    return "ddp"


def env_flag(name: str) -> bool:
    """An environment flag read as accelerate reads it (yes/true/on/1); a value it cannot read counts as unset."""
    from accelerate.utils import str_to_bool

    try:
        return bool(str_to_bool(os.environ.get(name, "0")))
    except ValueError:
        return False


def prepare_backend(cfg) -> dict:
    """Before the Accelerator (and CUDA) exists: refuse what cannot work, set determinism; returns Accelerator kwargs."""
    if cfg.deterministic:  # must precede the first cuBLAS call; the Slurm teams exported the same variable
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    from accelerate.utils import InitProcessGroupKwargs

    timeout = {"timeout": timedelta(seconds=cfg.ddp_timeout)}  # every training collective (rank-0 work: ranks.py)
    kind, cuda = launched_backend(), torch.cuda.is_available()
    if kind == "fsdp" and not cuda:
        raise UserError(
            "an FSDP launch config needs GPUs and none is visible (FSDP does not run on CPU); use "
            "accelerate_configs/cpu_ddp.yaml or deepspeed_zero2.yaml/deepspeed_zero3.yaml on CPU"
        )
    if kind != "deepspeed":
        return {"kwargs_handlers": [InitProcessGroupKwargs(**timeout)]}
    if env_flag("ACCELERATE_USE_CPU"):
        raise UserError(
            "ACCELERATE_USE_CPU is set with a DeepSpeed launch config: accelerate would silently train plain DDP "
            "instead; unset it (DeepSpeed finds the CPU by itself when there is no GPU)"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "the launch config asks for DeepSpeed, which is not installed: pip install -e '.[deepspeed]'"
        ) from None
    if cfg.nan_policy == "skip_step":
        raise UserError(
            "--nan_policy skip_step is not supported under DeepSpeed (the update happens inside its engine); "
            "use --nan_policy stop"
        )
    # The engine steps the optimizer itself, so torch's order check only ever sees the scheduler step; and DeepSpeed's
    # own collectives call deprecated torch names. Neither is something a user can act on.
    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    # DeepSpeed JIT-compiles its CPU communication op with ninja: the venv's ninja is on PATH only when activated
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cpu = {} if cuda else {"backend": "gloo"}  # DeepSpeed's default on CPU is oneCCL
    return {"kwargs_handlers": [InitProcessGroupKwargs(**timeout, **cpu)]}


def layout(accelerator) -> str:
    """What a checkpoint of this run holds: `ddp` (one full copy), `deepspeed-zero{N}` or `fsdp` (per-rank shards)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "fsdp" if accelerator.distributed_type == DistributedType.FSDP else "ddp"


def check_layout(folder: Path, saved: str | None, saved_world: int, accelerator) -> None:
    """Refuse, in one line, a checkpoint this launch cannot load exactly: another backend, or shards of another
    number of processes. (DDP checkpoints resume on any number of processes: see restore.py.)"""
    saved, now, world = saved or "ddp", layout(accelerator), accelerator.num_processes
    export = (
        f"or export it (python scripts/checkpoints.py export {folder} --to DIR) and start a new run from it "
        "with --model_name_or_path DIR --output_dir NEW"
        if saved != "fsdp"  # export reads DeepSpeed's shards, not FSDP's distributed checkpoint
        else "or use its final/ model, if the run finished"
    )
    if saved != now:
        raise UserError(
            f"{folder} was saved under {saved} and this launch is {now}: resume it with the launch config it was "
            f"trained with, {export}"
        )
    if saved != "ddp" and saved_world != world:
        raise UserError(
            f"{folder} holds {saved} shards of {saved_world} processes and this launch has {world}: resume it with "
            f"--num_processes {saved_world}, {export}"
        )


class Backend:
    """One process or DDP: accelerate's own calls."""

    def __init__(self, accelerator, cfg):
        self.accelerator, self.cfg = accelerator, cfg

    def describe(self) -> str:
        return layout(self.accelerator)

    def prepare_scheduler(self, scheduler, optimizer):
        return self.accelerator.prepare(scheduler)

    def micro_step(self, model, last_micro: bool):
        """Context for one micro-batch's forward and backward: gradients are synchronised on the window's last."""
        return contextlib.nullcontext() if last_micro else self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        self.accelerator.backward(loss)

    def clip_gradients(self, model) -> torch.Tensor | None:
        """The global gradient norm, clipped to --max_grad_norm when > 0 (None where the backend measures it later)."""
        from resumable.divergence import measure_and_clip

        return measure_and_clip(self.accelerator, model, self.cfg.max_grad_norm)

    def step(self, optimizer) -> str | None:
        """Apply the update; a reason to stop when the backend found non-finite gradients itself (else None)."""
        optimizer.step()
        return None

    def gather_weights(self, model, checkpoint: Path) -> dict | None:
        """Every rank calls this at the end (after saving `checkpoint`): the full state dict for final/ where the
        model is sharded or held in 16 bits, else None (final/ is the model as it is)."""
        return None


class FSDPBackend(Backend):
    def gather_weights(self, model, checkpoint: Path) -> dict | None:
        return self.accelerator.get_state_dict(model)  # a collective: every rank takes part, rank 0 gets the dict


class DeepSpeedBackend(Backend):
    def __init__(self, accelerator, cfg):
        super().__init__(accelerator, cfg)
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        accumulation = ds.get("gradient_accumulation_steps", "auto")
        if accumulation not in ("auto", 1):
            raise UserError(
                f"the DeepSpeed launch config sets gradient_accumulation_steps {accumulation}: set it to 1 and use "
                "--gradient_accumulation_steps (train.py accumulates, so that a short last window is scaled right)"
            )
        ds["gradient_accumulation_steps"] = 1
        ds["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
        ds["gradient_clipping"] = cfg.max_grad_norm  # one source of truth: --max_grad_norm (0: no clipping)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.accelerator.state.deepspeed_plugin.zero_stage}"

    @property
    def engine(self):
        return self.accelerator.deepspeed_engine_wrapped.engine

    def prepare_scheduler(self, scheduler, optimizer):
        from accelerate.scheduler import AcceleratedScheduler

        wrapped = AcceleratedScheduler(scheduler, optimizer, step_with_optimizer=False)
        self.accelerator._schedulers.append(wrapped)  # what save_state/load_state keep as scheduler.bin
        return wrapped

    def micro_step(self, model, last_micro: bool):
        return contextlib.nullcontext()  # ZeRO reduces gradients into partitions itself; the boundary tells it when

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last_micro)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the window's real size

    def clip_gradients(self, model) -> torch.Tensor | None:
        return None  # DeepSpeed clips (gradient_clipping = --max_grad_norm) and measures the norm inside its step

    def step(self, optimizer) -> str | None:
        """The engine's step; it checks the gradients itself (our loop sees no norm before it), and skips the update
        when they are not finite. Under fp16 that is loss scaling at work; otherwise the run has diverged."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if self.accelerator.mixed_precision == "fp16":
            return None
        if not self.engine.was_step_applied():
            return "non-finite gradients (DeepSpeed skipped the update)"
        if norm is not None and not math.isfinite(float(norm)):
            return f"gradient norm {float(norm)} reported by DeepSpeed (not finite)"
        return None

    def gather_weights(self, model, checkpoint: Path) -> dict | None:
        """The fp32 master weights, consolidated from the checkpoint's shards on rank 0: what the optimizer holds,
        not the 16-bit module copy of a mixed-precision run, and no ZeRO-3 16-bit gather setting needed."""
        if not self.accelerator.is_main_process:
            return None
        from resumable.checkpoint_tools import checkpoint_weights

        return checkpoint_weights(checkpoint)[0]


def refuse_unsafe_pickles(folder: Path) -> None:
    """DeepSpeed unpickles its shards (`*.pt`) unrestricted: a planted pickle would run code. Unpickle each
    first with torch's weights-only unpickler (memory-mapped: tensor data is not read), allowing tensors and
    DeepSpeed's own bookkeeping classes only; refuse the checkpoint in one line otherwise."""
    shards = sorted((folder / "pytorch_model").rglob("*.pt"))  # DeepSpeed's own folder (fp16's scaler.pt: accelerate)
    if not shards:
        return
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    for path in shards:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(
                f"{path}: refused before DeepSpeed unpickles it (unrestricted), as it holds more than "
                f"tensors and DeepSpeed's own state: {why}"
            ) from None


def make_backend(accelerator, cfg) -> Backend:
    """The backend of this launch; call before `accelerator.prepare` (DeepSpeed's config is completed here)."""
    kind = layout(accelerator)
    return (DeepSpeedBackend if kind.startswith("deepspeed") else FSDPBackend if kind == "fsdp" else Backend)(
        accelerator, cfg
    )

"""Weight averages: `--ema_decay` (an exponential moving average, updated after every optimizer step) and
`--swa_start_epoch` (stochastic weight averaging: the mean of the weights at the end of every epoch from then on,
with `--swa_lr` a constant learning rate from that epoch on). Each is part of every checkpoint, evaluated beside the
raw model (`eval_ema/*`, `eval_swa/*`), and what final/ holds (the raw weights in final_raw/).

The average is kept in fp32 on every process (the weights are the same on every DDP rank), updated with one
`torch._foreach_lerp_` (a skipped fp16/non-finite step does not move an EMA), and saved by rank 0 as
`ema.safetensors` / `swa.safetensors` with its update count. Evaluation swaps it into the model and back by copies,
so training continues bit for bit. Sharded weights (ZeRO-3, FSDP) are refused in one line.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from resumable.config_checks import require
from resumable.errors import UserError
from resumable.logs import get_logger

log = get_logger(__name__)
FLAGS = {"ema": "--ema_decay", "swa": "--swa_start_epoch"}


class NoAverage:
    """No average to keep."""

    kind = ""

    def after_step(self, applied: bool, ended_epoch: int | None) -> None:
        """Called after every optimizer step: `applied` (the update was not skipped), `ended_epoch` (the index of
        the epoch this step finished, or None)."""

    def schedule(self, scheduler):
        return scheduler

    def evaluated(self, evaluate, metrics: dict) -> dict | None:
        return {}

    def checkpoint_files(self) -> dict:
        return {}

    def resume(self, checkpoint: Path | None) -> None:
        pass

    @contextlib.contextmanager
    def final(self, out: Path, model, tokenizer, weights: dict | None):
        """The weights final/ gets (`weights`, or the model's own when None)."""
        yield weights


class WeightAverage(NoAverage):
    """An fp32 copy of the trainable weights, moved towards them by `update()`."""

    def __init__(self, accelerator, model):
        self.accelerator, self.updates = accelerator, 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @property
    def file(self) -> str:
        return f"{self.kind}.safetensors"

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """shadow += weight * (weights - shadow)."""
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the block; the trained ones back after it, bit for bit."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def evaluated(self, evaluate, metrics: dict) -> dict | None:
        """`evaluate()` of the averaged model as `eval_ema/*` or `eval_swa/*` (None if a stop request cut it short).
        Before anything is averaged the average is the model itself: its metrics are the raw ones."""
        if self.updates:
            with self.applied():
                metrics = evaluate()
        return None if metrics is None else {k.replace("eval/", f"eval_{self.kind}/", 1): v for k, v in metrics.items()}

    def checkpoint_files(self) -> dict:
        if not self.accelerator.is_main_process:
            return {}
        from resumable.checkpoint import TensorFile

        return {self.file: TensorFile(dict(zip(self.names, self.shadow)), {"updates": str(self.updates)})}

    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        from safetensors import safe_open

        path = checkpoint / self.file
        if not path.is_file():
            raise UserError(f"{checkpoint}: has no {self.file} (trained without {FLAGS[self.kind]}); resume without it")
        with safe_open(str(path), "pt") as fh:
            if sorted(fh.keys()) != sorted(self.names):
                raise UserError(f"{path}: holds other parameters than this model's")
            for i, name in enumerate(self.names):
                self.shadow[i].copy_(fh.get_tensor(name))
            self.updates = int(fh.metadata().get("updates", 0))

    @contextlib.contextmanager
    def final(self, out: Path, model, tokenizer, weights: dict | None):
        """The raw model goes to final_raw/; final/ gets the averaged weights, in the model (or in `weights`, the
        gathered state dict, every name of a tied parameter included)."""
        from resumable.export import save_pretrained_atomically

        if not self.updates:
            log.warning(f"{FLAGS[self.kind]}: nothing was averaged (no epoch ended from the start epoch on); "
                        "final/ holds the trained weights")  # fmt: skip
            yield weights
            return
        save_pretrained_atomically(model, tokenizer, out / "final_raw", weights)
        with self.applied():
            if weights is not None:
                names: dict[int, list[str]] = {}
                for key, tensor in model.state_dict(keep_vars=True).items():
                    names.setdefault(id(tensor), []).append(key)
                weights = dict(weights)
                for param, shadow in zip(self.params, self.shadow):
                    for key in names.get(id(param), []):
                        weights[key] = shadow.to(weights[key].dtype) if key in weights else shadow
            yield weights


class EMA(WeightAverage):
    kind = "ema"

    def __init__(self, accelerator, model, decay: float):
        super().__init__(accelerator, model)
        self.decay = decay

    def after_step(self, applied: bool, ended_epoch: int | None) -> None:
        """shadow = d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)) after n updates: the
        warm-up keeps a short run's average from being mostly its initial weights (0.999^200 = 0.82)."""
        if applied:
            self.update(1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates)))


class SWA(WeightAverage):
    kind = "swa"

    def __init__(self, accelerator, model, start_epoch: int, swa_lr: float | None, steps_per_epoch: int | None):
        super().__init__(accelerator, model)
        self.start_epoch, self.swa_lr, self.steps_per_epoch = start_epoch, swa_lr, steps_per_epoch

    def after_step(self, applied: bool, ended_epoch: int | None) -> None:
        """The running mean of the epoch-end weights: the n-th one enters with weight 1/n (the first is copied)."""
        if ended_epoch is not None and ended_epoch >= self.start_epoch:
            self.update(1.0 / (self.updates + 1))

    def schedule(self, scheduler):
        """--swa_lr: from the first step of the start epoch on, the learning rate is swa_lr (the schedule before)."""
        if not self.swa_lr:
            return scheduler
        start = self.start_epoch * self.steps_per_epoch
        for i, before in enumerate(scheduler.lr_lambdas):  # closures, not objects: state_dict() leaves them out
            scheduler.lr_lambdas[i] = _swa_lambda(scheduler, i, before, start, self.swa_lr)
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):  # the current step's rate
            group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return scheduler


def _swa_lambda(scheduler, i: int, before, start: int, swa_lr: float):
    return lambda step: before(step) if step < start else swa_lr / scheduler.base_lrs[i]


def averaging_for(accelerator, cfg, model, feed):
    """The run's weight average (a do-nothing one without --ema_decay / --swa_start_epoch); after prepare()."""
    from resumable.backend import layout as layout_of

    if not cfg.ema_decay and cfg.swa_start_epoch is None:
        return NoAverage()
    flag = "--ema_decay" if cfg.ema_decay else "--swa_start_epoch"
    layout = layout_of(accelerator)
    if layout.startswith("deepspeed") and accelerator.mixed_precision != "no":  # the engine's weights are 16-bit
        raise UserError(f"{flag} under DeepSpeed with --mixed_precision {accelerator.mixed_precision} would "
                        "average the 16-bit copies, not the fp32 master weights; use DDP, or fp32")  # fmt: skip
    if layout in ("deepspeed-zero3", "fsdp"):
        raise UserError(f"{flag} needs the full weights on every process; under {layout} they are sharded "
                        f"(use DDP or ZeRO-2, or train without {flag})")  # fmt: skip
    model = accelerator.unwrap_model(model)
    if cfg.ema_decay:
        return EMA(accelerator, model, cfg.ema_decay)
    steps = feed.batches_per_epoch and math.ceil(feed.batches_per_epoch / cfg.gradient_accumulation_steps)
    ended = math.floor(cfg.max_steps / steps) if cfg.max_steps > 0 and steps else math.floor(cfg.num_train_epochs)
    if cfg.max_steps <= 0 or steps:  # (a stream's epochs have no known length)
        require(cfg.swa_start_epoch < ended, f"--swa_start_epoch {cfg.swa_start_epoch}: the run ends {ended} "
                f"epoch(s) (0..{ended - 1}), so none would be averaged")  # fmt: skip
    return SWA(accelerator, model, cfg.swa_start_epoch, cfg.swa_lr, steps)

"""--ema_decay: an exponential moving average of the weights, part of every checkpoint, evaluated beside the raw
model (`eval_ema/*`), and what final/ holds (the raw weights in final_raw/).

The average is kept in fp32 on every process (the weights are the same on every DDP rank), updated with one
`torch._foreach_lerp_` after each applied optimizer step (a skipped fp16/non-finite step does not move it), and
saved by rank 0 as `ema.safetensors` with its update count. Evaluation swaps it into the model and back by copies,
so training continues bit for bit. Sharded weights (ZeRO-3, FSDP) are refused in one line.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from resumable.errors import UserError

EMA_FILE = "ema.safetensors"


class NoAverage:
    """--ema_decay 0: nothing to keep."""

    def after_step(self) -> None:
        pass

    def evaluated(self, evaluate) -> dict | None:
        return {}

    def checkpoint_files(self) -> dict:
        return {}

    def resume(self, checkpoint: Path | None) -> None:
        pass

    @contextlib.contextmanager
    def final(self, out: Path, model, tokenizer, weights: dict | None):
        """The weights final/ gets (`weights`, or the model's own when None)."""
        yield weights


class EMA(NoAverage):
    def __init__(self, accelerator, model, decay: float):
        self.accelerator, self.decay, self.updates = accelerator, decay, 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        """shadow = d * shadow + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n)) after n updates: the
        warm-up keeps a short run's average from being mostly its initial weights (0.999^200 = 0.82)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)
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

    def evaluated(self, evaluate) -> dict | None:
        """`evaluate()` of the averaged model as `eval_ema/*` (None if a stop request cut it short)."""
        with self.applied():
            metrics = evaluate()
        return None if metrics is None else {k.replace("eval/", "eval_ema/", 1): v for k, v in metrics.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(self.names, self.shadow)}

    def checkpoint_files(self) -> dict:
        if not self.accelerator.is_main_process:
            return {}
        from safetensors.torch import save_file

        tensors = self.tensors()
        return {EMA_FILE: lambda path: save_file(tensors, str(path), {"updates": str(self.updates)})}

    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        from safetensors import safe_open

        path = checkpoint / EMA_FILE
        if not path.is_file():
            raise UserError(f"{checkpoint}: has no {EMA_FILE} (trained without --ema_decay); resume without it")
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


def averaging_for(accelerator, cfg, model):
    """The run's weight average (a do-nothing one without --ema_decay); call after accelerator.prepare."""
    from resumable.backend import layout as layout_of

    if not cfg.ema_decay:
        return NoAverage()
    layout = layout_of(accelerator)
    if layout.startswith("deepspeed") and accelerator.mixed_precision != "no":  # the engine's weights are 16-bit
        raise UserError(f"--ema_decay under DeepSpeed with --mixed_precision {accelerator.mixed_precision} would "
                        "average the 16-bit copies, not the fp32 master weights; use DDP, or fp32")  # fmt: skip
    if layout in ("deepspeed-zero3", "fsdp"):
        raise UserError(f"--ema_decay needs the full weights on every process; under {layout} they are sharded "
                        "(use DDP or ZeRO-2, or train without --ema_decay)")  # fmt: skip
    return EMA(accelerator, accelerator.unwrap_model(model), cfg.ema_decay)

"""A loss or gradient norm that is not finite: stop before it reaches the weights, or skip that update.

The check runs before `optimizer.step()`, and its flag travels in the loop's one all-reduce, so every rank takes the
same decision at the same step and no checkpoint ever holds weights a NaN has touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from resumable.backend import launched_backend
from resumable.checkpoint import find_latest_checkpoint
from resumable.logs import get_logger
from resumable.preemption import write_run_status
from resumable.ranks import ranks

log = get_logger(__name__)
EXIT_DIVERGED = 3  # the run stopped itself: re-running the same command would diverge again
FAULT_ENV = "RESUMABLE_FAULT"  # chaos tests: nan_loss:STEP poisons that step's loss on this process


def measure_and_clip(accelerator, model: torch.nn.Module, max_grad_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to `max_grad_norm` when > 0). After the gradient all-reduce every rank
    holds the same gradients, so every rank computes the same norm."""
    if max_grad_norm > 0:
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def skip_update(accelerator) -> None:
    """Leave the weights alone for this update. Under fp16 the loss scaler must still end its iteration, as it does
    when it skips an overflowing step itself: otherwise the next `unscale_` raises ("already been called since the
    last update"). Lowering the scale is what the scaler would have done with these gradients."""
    scaler = accelerator.scaler
    if scaler is not None and scaler.is_enabled():
        scaler.update(float(scaler.get_scale() * scaler.get_backoff_factor()))


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward: a finite loss whose update would be garbage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def poison(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Tests inject a NaN into the loss (`RESUMABLE_FAULT=nan_loss:STEP`) or only into the gradients
    (`nan_grad:STEP`) of a chosen step."""
    fault = os.environ.get(FAULT_ENV)
    if fault == f"nan_loss:{step}":
        return loss * float("nan")
    return _NanGradient.apply(loss) if fault == f"nan_grad:{step}" else loss


class NanGuard:
    """`--nan_policy stop|skip_step`: what a non-finite loss or gradient norm does to the run."""

    def __init__(self, policy: str, max_skips: int, scaler_active: bool):
        self.policy, self.max_skips = policy, max_skips
        self.scaler_active = scaler_active  # fp16: an inf gradient is the loss scaler's business (it skips the step)

    def local_flag(self, window_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """1.0 if this rank saw a non-finite loss or gradient norm (None: the backend measures the norm in its own
        step, DeepSpeed; the loss is checked)."""
        bad = ~torch.isfinite(window_loss)
        if not self.scaler_active and grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm.to(window_loss.device))
        return bad.float()

    def diverged(self, bad: bool, progress, loss: float, grad_norm: torch.Tensor | None) -> str:
        """Called with the ranks' agreed flag for the update about to happen. Returns "" to go on (the caller skips
        the update when `bad`), or the line that stops the run."""
        if not bad:
            progress.nonfinite_in_a_row = 0
            return ""
        norm = "not measured before the update" if grad_norm is None else f"{grad_norm.item():g}"
        what = f"step {progress.step + 1}: loss {loss:g}, gradient norm {norm}"
        if self.policy == "stop":
            return f"{what}: not finite (--nan_policy stop)"
        progress.nonfinite_in_a_row += 1
        progress.skipped_steps += 1
        if progress.nonfinite_in_a_row > self.max_skips:
            return (
                f"{what}: {progress.nonfinite_in_a_row} non-finite updates in a row (--max_nan_skips {self.max_skips})"
            )
        log.warning(
            f"{what}: not finite, update skipped ({progress.nonfinite_in_a_row} in a row, {progress.skipped_steps} "
            f"in all; the run stops after {self.max_skips} in a row)"
        )
        return ""


def stop_diverged(writer, out: Path, step: int, reason: str) -> int:
    """Stop every rank without saving (the update was not applied, but nothing after it can be trusted either).
    A pending --async_save commit (`writer`'s) finishes first: the last good checkpoint named below is on disk."""
    accelerator, mirror = writer.accelerator, writer.mirror
    try:
        writer.wait()
    except Exception as err:  # the divergence stays the headline; the failed save is said too
        log.error(f"the pending checkpoint save failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if accelerator.is_main_process:
        latest = find_latest_checkpoint(out / "checkpoints", deep=False)
        advice = (
            f"Last good checkpoint: {latest}. To resume from it, run with a lower --learning_rate (and "
            "--resume_from_checkpoint latest if the command says none)"
            if latest
            else "No checkpoint yet. Run again with a lower --learning_rate"
        )
        if launched_backend() != "deepspeed":  # refused there: the update happens inside the engine
            advice += ", or use --nan_policy skip_step"
        log.error(f"{reason}; stopped before the update, nothing saved. {advice}")
        write_run_status(out, "diverged", EXIT_DIVERGED, step, reason=reason)
        if mirror:
            for name in ("run_status.json", "train.log"):
                mirror.push_file(name)
    ranks(accelerator).wait()  # rank 0 pushes the logs of a remote run first
    accelerator.end_training()
    return EXIT_DIVERGED

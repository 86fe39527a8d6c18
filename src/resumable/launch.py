"""Launcher quirks, handled once: make a multi-process CPU launch really distributed, and refuse one that is not."""

from __future__ import annotations

import os

from resumable.errors import UserError


def enable_cpu_distributed() -> None:
    """Under torchrun/`accelerate launch` with several processes and no GPU, join them over gloo.

    accelerate's MULTI_GPU launcher (what a config file with `num_processes: 2` uses) does not pass `use_cpu` on
    to the workers; on a machine without GPUs each worker then trains alone, believing it is rank 0 of 1.
    Setting ACCELERATE_USE_CPU before the Accelerator exists makes them form one gloo process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        import torch  # (not under DeepSpeed: ACCELERATE_USE_CPU would make accelerate silently drop it for DDP)

        if not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def check_distributed(num_processes: int) -> None:
    """Refuse to train when the launcher started N processes that are not one distributed job."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes but they are not connected (each sees {num_processes}); "
            "on CPU set ACCELERATE_USE_CPU=1 or use accelerate_configs/cpu_ddp.yaml"
        )

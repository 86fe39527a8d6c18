"""Which random generators a restore left different from the saved ones: accelerate only logs a failed restore."""

from __future__ import annotations

import torch


def unrestored_generators(saved: dict) -> list[str]:
    """The generators whose state now differs from the saved one (Python, NumPy, torch CPU, every accelerator's)."""
    import random

    import numpy as np

    def same_numpy(a, b) -> bool:
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    bad = []
    if "random_state" in saved and random.getstate() != saved["random_state"]:
        bad.append("python")
    if "numpy_random_seed" in saved and not same_numpy(np.random.get_state(), saved["numpy_random_seed"]):
        bad.append("numpy")
    if not torch.equal(saved["torch_manual_seed"], torch.get_rng_state()):
        bad.append("torch")
    for key, value in saved.items():  # torch_cuda_manual_seed, torch_xpu_manual_seed, ...: one state per device
        device = key.removeprefix("torch_").removesuffix("_manual_seed")
        module = getattr(torch, device, None) if key != "torch_manual_seed" and key.endswith("_manual_seed") else None
        if module is not None and module.is_available():
            now = module.get_rng_state_all()
            if len(now) != len(value):  # a node with another GPU count (elastic): this process's own device counts
                index = module.current_device()
                now, value = now[index : index + 1], value[index : index + 1]
            if len(now) != len(value) or not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(now, value)):
                bad.append(device)
    if "xm_seed" in saved:
        import torch_xla.core.xla_model as xm

        if xm.get_rng_state() != saved["xm_seed"]:
            bad.append("xla")
    return bad

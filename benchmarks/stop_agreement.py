"""What stop agreement costs per optimizer step on 2 processes: the loss all-reduce train.py already does, with the
stop flag riding in it, against the loss alone and against a separate collective just for the flag.

    .venv/bin/accelerate launch --config_file accelerate_configs/cpu_ddp.yaml benchmarks/stop_agreement.py

(gloo on CPU here; NCCL on a GPU cluster has a higher fixed latency per collective, which is why a separate
flag collective every step is avoided.)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from resumable.launch import enable_cpu_distributed  # noqa: E402


def per_call_us(fn, calls: int = 2000, repeats: int = 5) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rates)


def main() -> None:
    enable_cpu_distributed()
    import torch
    from accelerate import Accelerator

    acc = Accelerator()
    loss, flag = torch.tensor(2.5), False
    loss_only = per_call_us(lambda: acc.reduce(loss.clone(), "sum").item())
    piggyback = per_call_us(lambda: acc.reduce(torch.stack([loss, torch.tensor(float(flag))]), "sum").tolist())
    separate = per_call_us(lambda: (acc.reduce(loss.clone(), "sum").item(), acc.reduce(torch.tensor([0.0]), "sum")))
    if acc.is_main_process:
        print(f"processes: {acc.num_processes} ({acc.distributed_type})")
        print(f"loss all-reduce alone:              {loss_only:7.1f} us per step")
        print(f"loss + stop flag in one all-reduce: {piggyback:7.1f} us per step (what train.py does)")
        print(f"loss, then a separate flag reduce:  {separate:7.1f} us per step")
        print(
            f"agreement cost: {piggyback - loss_only:+.1f} us per step piggybacked vs {separate - loss_only:+.1f} us separate"
        )


if __name__ == "__main__":
    main()

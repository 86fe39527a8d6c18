"""Weight averaging's cost: one EMA update (paid every optimizer step) and one SWA average (paid once per epoch)
next to one AdamW step, on the tiny default GPT-2 and on a GPT-2-124M-sized config, CPU, medians of `--repeats`.

    .venv/bin/python benchmarks/averaging.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def measure(n_layer: int, n_embd: int, n_head: int, vocab: int, repeats: int) -> tuple[float, float, float, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from resumable.averaging import EMA, SWA

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    accelerator = type("A", (), {"is_main_process": True})()
    ema, swa = EMA(accelerator, model, 0.999), SWA(accelerator, model, 0, None, None)
    step, update, average = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        opt.step()
        step.append(time.perf_counter() - t)
        t = time.perf_counter()
        ema.after_step(True, None)
        update.append(time.perf_counter() - t)
        t = time.perf_counter()
        swa.after_step(True, 0)  # an epoch's end
        average.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters())
    return statistics.median(step), statistics.median(update), statistics.median(average), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(
        "| model | parameters | AdamW step | EMA update (every step) | EMA / AdamW | SWA average (every epoch) | SWA / AdamW |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, shape in {"tiny (tiny_lm preset)": (2, 128, 4, 4096), "GPT-2 124M config": (12, 768, 12, 50257)}.items():
        step, update, average, n = measure(*shape, args.repeats)
        print(
            f"| {name} | {n / 1e6:.1f}M | {step * 1e3:.2f} ms | {update * 1e3:.2f} ms | {update / step:.2f}x "
            f"| {average * 1e3:.2f} ms | {average / step:.2f}x |"
        )


if __name__ == "__main__":
    main()

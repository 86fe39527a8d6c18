"""--async_save: how long a checkpoint blocks training, synchronous vs asynchronous, for a GPT-2-124M-sized model
with AdamW on CPU, through the same writers scripts/train.py uses (resumable/checkpoint_writer.py); and whether a
training step run while the background write is in flight is slower than one without it.

    .venv/bin/python benchmarks/async_save.py --repeats 3 [--n_layer 12 --n_embd 768]

Medians of interleaved repeats. The async save's memory cost is one CPU copy of the weights and optimizer state
(reused from save to save), reported as its size.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    import torch
    from checkpoint_io import gpt2_setup

    from resumable.checkpoint import Progress
    from resumable.checkpoint_writer import AsyncCheckpointWriter, CheckpointWriter
    from resumable.retention import RetentionPolicy

    a, acc, model, opt = gpt2_setup(__doc__)
    batch = torch.randint(0, 1000, (4, 128))

    def step() -> float:
        t = time.perf_counter()
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t

    step()  # Adam's moments exist, kernels warm
    rows: dict[str, list[float]] = {
        k: [] for k in ("sync", "async blocked", "async background", "step", "step during write")
    }
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cfg = type("Cfg", (), {"checkpoints_dir": Path(tmp), "ddp_timeout": 600})()
        policy = RetentionPolicy(keep_last=2, keep_best=0)
        writers = {
            "sync": CheckpointWriter(acc, cfg, policy, None),
            "async": AsyncCheckpointWriter(acc, cfg, policy, None),
        }
        for r in range(a.repeats):
            rows["step"].append(step())
            for name, writer in writers.items():
                progress = Progress(step=2 * r + (name == "async") + 1)
                t = time.perf_counter()
                writer.save(progress, {}, {})
                blocked = time.perf_counter() - t
                if name == "async":
                    rows["step during write"].append(step())
                    writer.wait()
                    rows["async blocked"].append(blocked)
                    rows["async background"].append(writer.background_s)
                else:
                    rows["sync"].append(blocked)
        copy_bytes = sum(b.numel() * b.element_size() for b in writers["async"].buffers.values())
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"GPT-2 ({sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters) + AdamW, {a.repeats} repeats")
    print("| measure | median | vs sync save |")
    print("|---|---|---|")
    print(f"| sync save (write + fsync + sha256 + commit) | {med['sync']:.2f} s | 1.00x |")
    print(
        f"| async: training blocked (CPU copy + small files) | {med['async blocked']:.2f} s | {med['async blocked'] / med['sync']:.2f}x |"
    )
    print(
        f"| async: background write to commit | {med['async background']:.2f} s | {med['async background'] / med['sync']:.2f}x |"
    )
    print(f"| training step (batch 4 x 128), no save | {med['step']:.2f} s | |")
    print(
        f"| training step while the background write runs | {med['step during write']:.2f} s | {med['step during write'] / med['step']:.2f}x of a step |"
    )
    print(f"| async CPU copy (memory) | {copy_bytes / 2**30:.2f} GiB | |")


if __name__ == "__main__":
    main()

"""What checksumming costs: save / commit (fsync + sha256 manifest) / verify / load times for a ~124M-parameter
GPT-2 with AdamW state, through the same accelerate save_state/load_state and commit code train.py uses.

    .venv/bin/python benchmarks/checkpoint_io.py --repeats 3 [--n_layer 12 --n_embd 768]

Prints medians and ms per GB of checkpoint. The page cache is warm (a just-written checkpoint), as on resume.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def gpt2_setup(doc: str) -> tuple:
    """(args, accelerator, model, optimizer): a GPT-2 of --n_layer x --n_embd with AdamW's moments materialised,
    prepared on the CPU (shared by the checkpoint benchmarks)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    a = p.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 1000, (1, 8)), labels=torch.randint(0, 1000, (1, 8))).loss.backward()
    opt.step()  # materialise Adam's two moments
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return a, acc, model, opt


def main() -> None:
    from resumable.checkpoint import Progress, _hash_files, commit_checkpoint, verify_checkpoint

    a, acc, model, opt = gpt2_setup(__doc__)
    params = sum(t.numel() for t in model.parameters())
    rows: dict[str, list[float]] = {k: [] for k in ("save_state", "commit", "hash only", "verify", "load_state")}
    size = 0
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        for r in range(a.repeats):
            staging, final = Path(tmp) / f".tmp-step-{r}", Path(tmp) / f"step-{r}"
            staging.mkdir()
            t0 = time.perf_counter()
            acc.save_state(str(staging))
            (staging / "progress.json").write_text(str(Progress()))
            t1 = time.perf_counter()
            commit_checkpoint(staging, final, r, {})
            t2 = time.perf_counter()
            _hash_files(final)
            t3 = time.perf_counter()
            assert verify_checkpoint(final) is None
            t4 = time.perf_counter()
            acc.load_state(str(final))
            t5 = time.perf_counter()
            for key, dt in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                rows[key].append(dt)
            size = sum(f.stat().st_size for f in final.iterdir())
    gb = size / 1e9
    print(f"model: {params / 1e6:.1f}M parameters; checkpoint {size / 1e9:.2f} GB (weights + AdamW + RNG)")
    print(f"{'phase':>11}  {'median s':>8}  {'ms per GB':>9}   runs")
    for key, times in rows.items():
        med = statistics.median(times)
        print(f"{key:>11}  {med:8.3f}  {med * 1e3 / gb:9.0f}   {', '.join(f'{t:.3f}' for t in times)}")
    save = statistics.median(rows["save_state"])
    print(
        f"commit (fsync + sha256 + manifest + rename) adds {statistics.median(rows['commit']) / save:.0%} to save_state"
    )
    print(
        f"verify before load adds {statistics.median(rows['verify']) / statistics.median(rows['load_state']):.0%} to load_state"
    )


if __name__ == "__main__":
    main()

"""benchmarks/compare.py's output: a markdown table, the raw numbers as JSON, and one PNG of the ratios."""

from __future__ import annotations

import json
from pathlib import Path

SHORT = {"raw": "raw loop", "accelerate": "accelerate loop", "trainer": "HF Trainer", "train.py": "train.py"}
NAMES = {"raw": "raw PyTorch loop", "accelerate": "minimal accelerate loop", "trainer": "HF Trainer",
         "train.py": "scripts/train.py", "train.py --async_save": "scripts/train.py --async_save"}  # fmt: skip


def table(rows: dict, machine: str) -> str:
    launch_keys = next(r["launch_s"] for r in rows.values() if r["launch_s"])
    head = ["variant", "steps/s (x raw)", "peak RSS (x raw)", *(f"first step: {k}" if k == "fresh" else
            f"resumed at {k}" for k in launch_keys), "save blocks (ms)", "checkpoint bytes (x state)",
            "SIGKILL + resume bitwise"]  # fmt: skip
    lines = [f"Measured on {machine} (`make bench`).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for v, r in rows.items():
        cells = [NAMES[v]]
        if r["steps_per_s"] is None:
            cells += ["(as above)", "(as above)", *["(as above)"] * len(launch_keys)]
        else:
            cells += [f"{r['steps_per_s']:.2f} ({r['steps_ratio']:.3f}x)", f"{r['rss_ratio']:.2f}x",
                      *(f"{s:.2f} s" for s in r["launch_s"].values())]  # fmt: skip
        cells += [f"{r['blocked_ms']:.0f}", f"{r['bytes_ratio']:.2f}x", "yes" if r["bitwise"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, machine: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = [v for v, r in rows.items() if r["steps_per_s"] is not None]
    label = {v: f"{NAMES[v]}\n(bitwise: {'yes' if rows[v]['bitwise'] else 'no'})" for v in rows}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    ax.barh([label[v] for v in loops], [rows[v]["steps_ratio"] for v in loops], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_title("steady-state steps/s, x raw loop (higher is better)")
    ax.set_xlim(0.8, max(1.1, max(rows[v]["steps_ratio"] for v in loops) + 0.05))
    ax = axes[0][1]
    keys = list(rows[loops[0]]["launch_s"])
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([j + i * width for j in range(len(loops))], [rows[v]["launch_s"][k] for v in loops], width,
               label="fresh start" if k == "fresh" else f"resumed at {k} batches")  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loops))], [SHORT[v] for v in loops], fontsize=9)
    ax.set_title("launch to first step, s (lower is better)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.barh([label[v] for v in rows], [rows[v]["blocked_ms"] for v in rows], color="tab:orange")
    ax.set_title("training blocked per checkpoint save, ms (lower is better)")
    ax = axes[1][1]
    ax.barh([NAMES[v] for v in loops], [rows[v]["rss_ratio"] for v in loops], color="tab:green")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlim(0.8, max(1.1, max(rows[v]["rss_ratio"] for v in loops) + 0.05))
    ax.set_title("peak resident memory, x raw loop (lower is better)")
    fig.suptitle(f"resumable vs the loops users would otherwise write — {machine}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: dict, machine: str, runs: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, machine)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps({"machine": machine, "rows": rows, "runs": runs}, indent=1))
    plot(rows, machine, out / "compare.png")
    print("\n" + text)
    print(f"written: {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")

"""The offline sweep's results: a table (markdown + CSV) sorted by the metric, and the metric against each swept
parameter (PNG), written under the sweep's --output_dir whenever a runner finishes."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from resumable.sweep_spec import log_scale
from resumable.trials import Trial


def final_metric(trial: Trial, metric: str) -> float | None:
    """The metric's last logged value (what W&B's run summary holds, and what the engine optimizes)."""
    values = [h[metric] for h in trial.history if metric in h]
    return values[-1] if values else None


def ranked(trials: list[Trial], sweep: dict) -> list[Trial]:
    metric, sign = sweep["metric"]["name"], -1 if sweep["metric"].get("goal") == "maximize" else 1

    def key(t: Trial):
        value = final_metric(t, metric)
        return (value is None or not math.isfinite(value), sign * value if value is not None else 0, t.index)

    return sorted(trials, key=key)


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(trials: list[Trial], sweep: dict, exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The table, best first; `exact`: parameters as given (the CSV), else floats to 4 significant digits."""
    metric, names = sweep["metric"]["name"], list(sweep["parameters"])
    header = ["trial", "status", *names, metric, "steps", "minutes"]
    table = []
    for t in ranked(trials, sweep):
        value = final_metric(t, metric)
        steps = t.history[-1]["step"] if t.history else ""
        table.append([t.id, t.status, *((str if exact else _shown)(t.params.get(n, "")) for n in names),
                      "" if value is None else f"{value:.4f}", str(steps), f"{t.seconds / 60:.1f}"])  # fmt: skip
    return header, table


def write_results(root: Path, trials: list[Trial], sweep: dict) -> list[Path]:
    """results.md, results.csv and results.png in `root`; returns the paths written."""
    header, table = rows(trials, sweep, exact=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *table])
    header, table = rows(trials, sweep)
    (root / "results.csv").write_text(buf.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    written = [root / "results.md", root / "results.csv"]
    if plot(root / "results.png", trials, sweep):
        written.append(root / "results.png")
    return written


def plot(path: Path, trials: list[Trial], sweep: dict) -> bool:
    """The final metric against each swept parameter, one panel each (False when no trial has a metric yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, names = sweep["metric"]["name"], list(sweep["parameters"])
    scored = [(t, final_metric(t, metric)) for t in trials]
    scored = [(t, v) for t, v in scored if v is not None and math.isfinite(v)]
    if not scored:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs = [t.params.get(name) for t, _ in scored]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs}) if not numeric else []
        points = [x if numeric else labels.index(str(x)) for x in xs]
        ax.scatter(points, [v for _, v in scored], s=28)
        for x, (t, v) in zip(points, scored):  # which trial each point is (results.md has its parameters)
            ax.annotate(str(t.index), (x, v), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if numeric and log_scale(name, sweep, xs):
            ax.set_xscale("log")
        if labels:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    fig.suptitle(f"{sweep.get('name') or path.parent.name}: {metric} ({sweep['metric'].get('goal', 'minimize')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

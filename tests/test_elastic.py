"""Elastic resume: a run checkpointed on N processes continues on M, using every sample exactly once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY_LM, Run, ok, train_records
from test_resume_exact import reference

pytestmark = pytest.mark.slow
DATA = [*TINY_LM, "--max_train_samples", "72", "--record_samples", "true"]  # 72 distinct blocks


def samples_by_epoch(out: Path) -> dict[int, Counter]:
    """Example hashes seen in each epoch, all ranks and all runs of this output dir together."""
    seen: dict[int, Counter] = {}
    for path in sorted((out / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["epoch"], Counter()).update(record["samples"])
    return seen


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (("cpu_ddp", "4", "1"), ("python", "8", "1")),  # 2 processes x 4 -> 1 process x 8
        (("python", "4", "2"), ("cpu_ddp", "4", "1")),  # 1 process x 4 x accumulation 2 -> 2 processes x 4
    ],
    ids=["2to1", "1to2"],
)
def test_resume_on_another_process_count_uses_every_sample_exactly_once(
    before, after, tmp_path, tmp_path_factory, cache_dir
):
    def args(layout):
        _, batch, accumulation = layout
        return [*DATA, "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation]

    first = Run([*args(before), "--max_steps_per_run", "13"], tmp_path, cache_dir, launcher=before[0]).run()
    assert json.loads((tmp_path / "run_status.json").read_text())["step"] == 13, first.stderr[-3000:]
    second = ok(Run(args(after), tmp_path, cache_dir, launcher=after[0]).run())
    out = second.stdout + second.stderr
    assert "elastic resume: saved as" in out and "32 samples into the epoch" in out  # 13 steps x 8 - 72
    assert "global batch changed" not in out
    if after[0] == "cpu_ddp":  # rank 1 had no RNG of its own: derived and said so
        assert "has no RNG state for process 1" in out
    epochs = samples_by_epoch(tmp_path)
    assert sorted(epochs) == [0, 1, 2]
    dataset = epochs[0]
    assert len(dataset) == 72 and set(dataset.values()) == {1}
    for e in (1, 2):  # epoch 1 was interrupted 32 samples in and continued on the other layout
        assert epochs[e] == dataset, f"epoch {e}: samples missing or repeated"
    # the LR schedule continues at the right optimizer step: same values as an uninterrupted run
    ref = reference(tmp_path_factory, cache_dir, [*TINY_LM, "--max_train_samples", "72"], launcher="cpu_ddp")
    assert [r["lr"] for r in train_records(tmp_path)] == [r["lr"] for r in train_records(ref)]
    assert [r["step"] for r in train_records(tmp_path)] == list(range(1, 28))


def test_a_changed_global_batch_resumes_with_a_warning(tmp_path, cache_dir):
    Run([*DATA, "--max_steps_per_run", "5"], tmp_path, cache_dir).run_expecting(75)
    result = ok(Run([*DATA, "--per_device_train_batch_size", "8"], tmp_path, cache_dir).run())
    assert "WARNING global batch changed from 4 to 8" in result.stdout + result.stderr
    assert (tmp_path / "COMPLETE").exists()

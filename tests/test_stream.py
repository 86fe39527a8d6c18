"""--streaming: training data read, tokenized, packed and shuffled on the fly; kill anywhere and resume bitwise,
without reading what was consumed again, across several epochs of a finite stream, in 1 and 2 processes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    REPO,
    TINY_LM,
    Run,
    assert_bitwise_same_run,
    checkpoint_steps,
    logged_steps,
    ok,
    train_records,
)
from test_multinode import fetch_run
from test_remote import BUCKET, s3  # noqa: F401 (the moto server fixture)
from test_resume_exact import reference  # one uninterrupted run per (args, launcher), shared

from resumable.corpus import stdlib_root
from resumable.remote import staging_dir

CHECKPOINTS = str(REPO / "scripts" / "checkpoints.py")
_DROP = ("--max_train_samples", "--num_train_epochs")  # a stream is bounded by --max_steps
BASE = [a for i, a in enumerate(TINY_LM) if a not in _DROP and (i == 0 or TINY_LM[i - 1] not in _DROP)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 JSON-lines shards of stdlib text (2 documents each, one row without text) and a validation file:
    about 9 blocks of 32 tokens per process per epoch, so a 30-step run crosses several epochs."""
    folder = tmp_path_factory.mktemp("shards")
    modules = sorted(stdlib_root().glob("*.py"))[:9]
    texts = [m.read_text(encoding="utf-8")[:300] for m in modules]
    for i in range(4):
        rows = [{"text": texts[2 * i]}, {"id": i}, {"text": texts[2 * i + 1]}]
        (folder / f"train-{i:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text(json.dumps({"text": texts[8]}) + "\n")
    return folder


def stream_args(shards: Path, *extra: str) -> list[str]:
    return [*BASE, "--streaming", "--train_file", str(shards / "train-*.jsonl"),
            "--validation_file", str(shards / "validation.jsonl"), "--shuffle_buffer", "5", "--max_steps", "30",
            "--record_samples", *extra]  # fmt: skip


def samples_by_epoch(out: Path) -> dict[int, Counter]:
    seen: dict[int, Counter] = {}
    for path in sorted((out / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            seen.setdefault(r["epoch"], Counter()).update(r["samples"])
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,extra,kill_at",
    [("python", (), 17), ("python", ("--dataloader_num_workers", "2"), 13), ("cpu_ddp", (), 11)],
    ids=["1-process", "2-workers", "2-process-ddp"],
)
def test_a_streamed_run_killed_anywhere_resumes_bitwise(launcher, extra, kill_at, shards, tmp_path,
                                                        tmp_path_factory, cache_dir):  # fmt: skip
    args = stream_args(shards, *extra, "--checkpointing_steps", "3")
    ref = reference(tmp_path_factory, cache_dir, args, launcher)
    epochs = samples_by_epoch(ref)
    assert len(epochs) >= 3, "the run must cross several epochs of the finite stream"
    for epoch, counts in epochs.items():  # no block twice in an epoch, on any process
        assert max(counts.values()) == 1, f"epoch {epoch} trained a block twice"
    out = tmp_path / "killed"
    Run(args, out, cache_dir, launcher).kill_at_step(kill_at)
    resumed = max(checkpoint_steps(out))
    result = ok(Run(args, out, cache_dir, launcher).run())
    line = next(ln for ln in (result.stdout + result.stderr).splitlines() if "Resuming from" in ln)
    assert f"step-{resumed:08d}: step {resumed}" in line and "none read again" in line
    assert_bitwise_same_run(ref, out)
    assert samples_by_epoch(out) == epochs  # the same blocks in every epoch: nothing replayed, nothing skipped


@pytest.mark.slow
def test_a_stopped_stream_resumes_from_its_cursor_not_from_the_start(shards, tmp_path, tmp_path_factory, cache_dir):
    """Graceful stops every 4 steps (also at epoch ends): each resume continues the stream exactly."""
    args = stream_args(shards)
    ref = tmp_path / "ref"
    ok(Run(args, ref, cache_dir).run())
    out = tmp_path / "stopped"
    for _ in range(10):
        result = Run([*args, "--max_steps_per_run", "4"], out, cache_dir).run()
        if result.returncode == 0:
            break
        assert result.returncode == 75, result.stderr[-3000:]
    assert_bitwise_same_run(ref, out)
    ckpt = out / "checkpoints" / "step-00000028"
    state = json.loads((ckpt / "stream_state_0.json").read_text())
    assert state["world"] == 1 and state["roles"] == 1 and state["epoch"] >= 2
    shown = ok(subprocess.run([PYTHON, CHECKPOINTS, "inspect", str(ckpt)], capture_output=True, text=True)).stdout
    assert "stream_state_0.json" in shown and f"epoch {state['epoch']}, {state['batches']} micro-batches" in shown
    export = [
        PYTHON,
        CHECKPOINTS,
        "export",
        str(ckpt),
        "--to",
        str(tmp_path / "exported"),
        "--cache_dir",
        str(cache_dir),
    ]
    ok(subprocess.run(export, capture_output=True, text=True))
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_streaming_refuses_bad_flags_in_one_line(shards, tmp_path, cache_dir):
    cases = {
        ("--max_steps", "-1"): "--streaming needs --max_steps",
        ("--train_file", str(shards / "nothing-*.jsonl")): "no such file matches",
        ("--task", "sequence_classification"): "--streaming packs text into blocks for --task causal_lm",
        ("--shuffle_buffer", "0"): "--shuffle_buffer must be >= 1",
    }
    for flags, message in cases.items():
        args = [*stream_args(shards), *flags]
        result = Run(args, tmp_path / "bad", cache_dir).run_expecting(2)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    expanded = [str(p) for p in sorted(shards.glob("train-*.jsonl"))]  # an unquoted glob, expanded by the shell
    result = Run([*stream_args(shards), "--train_file", *expanded], tmp_path / "bad", cache_dir).run_expecting(2)
    assert "a flag takes one path (a glob the shell expanded?); quote it" in result.stderr
    csv = tmp_path / "a.csv"
    csv.write_text("text\nhello\n")
    result = Run([*stream_args(shards), "--train_file", str(csv)], tmp_path / "bad", cache_dir).run_expecting(2)
    assert "--streaming reads .txt, .jsonl, .json files" in result.stderr


def test_a_stream_position_is_not_resumed_on_other_data_or_another_layout(shards, tmp_path, tmp_path_factory,
                                                                           cache_dir):  # fmt: skip
    data = tmp_path_factory.mktemp("data")
    for f in shards.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    args = [*stream_args(data), "--max_steps_per_run", "6"]
    out = tmp_path / "run"
    Run(args, out, cache_dir).run_expecting(75)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    # another number of DataLoader workers deals the rows differently: refused, not silently re-dealt
    result = Run([*args, "--dataloader_num_workers", "2"], out, cache_dir).run()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dataloader_num_workers" in result.stderr.strip().splitlines()[-1]
    # a shard edited under the checkpoint
    with open(data / "train-01.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    result = Run(args, out, cache_dir).run_expecting(2)
    assert "the training data changed since" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("launcher", ["python", pytest.param("cpu_ddp", marks=pytest.mark.slow)])
def test_a_bad_row_in_a_shard_is_one_line_naming_the_file_on_every_rank(launcher, shards, tmp_path,
                                                                         tmp_path_factory, cache_dir):  # fmt: skip
    data = tmp_path_factory.mktemp("bad-data")
    for f in shards.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    if launcher == "cpu_ddp":  # past the first rows read up front: found while training, by one rank's stream
        (data / "train-00.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(2100)))
    with open(data / "train-03.jsonl", "a") as fh:
        fh.write('{"text": "cut off\n')
    result = Run([*stream_args(data), "--max_steps", "300"], tmp_path / "run", cache_dir, launcher).run()
    assert result.returncode != 0
    # each rank prints it (two processes' stderr may interleave with the step bar on one line)
    errors = re.findall(r"error: (?:rank \d: )?\S+ \(byte \d+\): not a JSON line", result.stderr)
    assert len(errors) == (2 if launcher == "cpu_ddp" else 1) and len(set(errors)) == 1, result.stderr[-3000:]
    assert "train-03.jsonl (byte " in errors[0]
    assert result.stderr.count("error:") == len(errors)  # and nothing else
    if launcher == "cpu_ddp":
        assert errors[0].startswith("error: rank ") and logged_steps(tmp_path / "run"), "found while training"
    assert 'train.py", line' not in result.stderr  # no traceback of ours (torchrun prints its own summary)


def test_a_hub_style_dataset_streams_through_datasets_and_resumes_bitwise(shards, tmp_path, cache_dir):
    """--dataset_name on a local dataset folder: the `datasets` streaming path the hub uses, shard by shard."""
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    for i, f in enumerate(sorted(shards.glob("train-*.jsonl"))):
        (folder / "data" / f"train-{i:05d}-of-00004.jsonl").write_bytes(f.read_bytes())
    (folder / "data" / "validation-00000-of-00001.jsonl").write_bytes((shards / "validation.jsonl").read_bytes())
    args = [*BASE, "--streaming", "--dataset_name", str(folder), "--max_steps", "20", "--shuffle_buffer", "5",
            "--dataloader_num_workers", "2", "--record_samples"]  # fmt: skip
    ref = tmp_path / "ref"
    ok(Run(args, ref, cache_dir).run())
    out = tmp_path / "stopped"
    Run([*args, "--max_steps_per_run", "7"], out, cache_dir).run_expecting(75)
    Run([*args, "--max_steps_per_run", "7"], out, cache_dir).run_expecting(75)
    ok(Run(args, out, cache_dir).run())
    assert_bitwise_same_run(ref, out)
    assert len(train_records(out)) == 20
    # both workers read their rows (datasets would split a shard across the workers once more)
    epoch0 = samples_by_epoch(ref)[0]
    assert max(epoch0.values()) == 1 and len(epoch0) >= 4 * 7  # 7 steps x 4 blocks fill epoch 0's share at least


@pytest.mark.slow
def test_a_streamed_run_with_an_s3_output_dir_resumes_from_the_bucket_bitwise(
    shards,
    s3,  # noqa: F811
    tmp_path,
    tmp_path_factory,
    cache_dir,
):
    """Stopped, its local staging folder lost (another machine), re-run: the stream position comes from the bucket."""
    args = stream_args(shards)
    ref = reference(tmp_path_factory, cache_dir, args, "python")
    url, cache = f"s3://{BUCKET}/stream-{uuid.uuid4().hex[:8]}", tmp_path / "cache"
    Run([*args, "--max_steps_per_run", "11"], url, cache).run_expecting(75)
    assert s3.exists(f"{url}/checkpoints/step-00000011/stream_state_0.json")
    shutil.rmtree(staging_dir(url, cache))
    ok(Run(args, url, cache).run())
    assert_bitwise_same_run(ref, fetch_run(s3, url, tmp_path / "fetched"))

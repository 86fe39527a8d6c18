"""What the ranks of one job share: caches built once and safely, one verification, patient waits, every RNG."""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, TINY_LM, Run, checkpoint_steps, logged_steps, ok

from resumable.random_state import unrestored_generators
from resumable.signal_lead import shutdown_timeout


def _build_tokenizer(target: str, barrier, results) -> None:
    import datasets

    import resumable.data as data
    from resumable.config import parse_config

    data.bpe_cache_dir = lambda cfg, train: Path(target)  # every builder writes the same cache entry
    cfg = parse_config(["--output_dir", str(Path(target).parent / "out"), "--vocab_size", "400"])
    texts = datasets.Dataset.from_dict({"text": [f"def f{i}(x):\n    return x * {i}\n" for i in range(300)]})
    barrier.wait()  # all at once, as the local ranks of a node with its own cache did
    try:
        results.put(type(data.load_tokenizer(cfg, {"train": texts})).__name__)
    except Exception as err:
        results.put(repr(err))


def test_concurrent_builders_of_one_tokenizer_cache_do_not_collide(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        target = tmp_path / f"tok{attempt}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_build_tokenizer, args=(str(target), barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        names = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert names == ["TokenizersBackend"] * 4  # what AutoTokenizer loads a trained BPE as
        assert (target / "tokenizer.json").is_file()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"tok{attempt}.")] == []  # no leftovers


def test_every_saved_generator_is_checked_after_a_restore():
    saved = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    saved["torch_manual_seed"] = torch.get_rng_state()
    assert unrestored_generators(saved) == []
    np.random.rand()
    assert unrestored_generators(saved) == ["numpy"]
    random.random()
    torch.rand(1)
    assert unrestored_generators(saved) == ["python", "numpy", "torch"]


def _anon_peak(script: str) -> dict:
    """Run `script` in a new process; its result and the peak of its anonymous memory (RssAnon) while it ran."""
    sampler = (
        "import threading, time, json\n"
        "peak = [0]\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024\n"
        "def watch():\n"
        "    while True:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.002)\n"
    )
    code = (
        sampler
        + script
        + (
            "base = rss(); peak[0] = base\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            "value = work()\n"
            "time.sleep(0.01)\n"
            "print(json.dumps({'value': value, 'growth': peak[0] - base}))\n"
        )
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_baselines_stream_the_corpus_instead_of_loading_it(tmp_path):
    """A tokenized corpus of 16M tokens (128 MB as int64): the baseline's memory stays at one chunk."""
    import datasets

    rows, block = 2**17, 128
    ids = np.random.default_rng(0).integers(0, 500, size=(rows, block), dtype=np.int64)
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "train"))
    datasets.Dataset.from_dict({"input_ids": ids[:64]}).save_to_disk(str(tmp_path / "val"))
    result = _anon_peak(
        "import datasets\n"
        "from resumable.metrics import baselines\n"
        f"train = datasets.load_from_disk({str(tmp_path / 'train')!r}).with_format('torch')\n"
        f"val = datasets.load_from_disk({str(tmp_path / 'val')!r}).with_format('torch')\n"
        "train[0]; val[0]\n"  # arrow and the format code warmed up
        "def work():\n"
        "    return baselines('causal_lm', train, val)['baseline/unigram_perplexity']\n"
    )
    assert result["growth"] < ids.nbytes / 8, f"grew {result['growth'] / 2**20:.1f} MiB"
    counts = np.bincount(ids.ravel(), minlength=500).astype(np.float64) + 1.0  # the definition, computed directly
    logp = np.log(counts / counts.sum())
    expected = math.exp(-logp[ids[:64, 1:].ravel()].mean())
    assert math.isclose(result["value"], expected, rel_tol=1e-9)


@pytest.mark.slow
def test_rank_0_work_longer_than_the_ddp_timeout_does_not_kill_the_job(tmp_path):
    """Rank 0 alone builds the corpus (8 s) and commits each checkpoint (5 s); the other rank waits through a
    patient side channel, not a training collective with --ddp_timeout 4."""
    env = {"RESUMABLE_DELAY": "build_corpus:8,rank0_commit:5"}
    args = [*TINY_LM, "--max_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "4", "--ddp_timeout", "4"]
    started = time.monotonic()
    result = ok(Run(args, tmp_path / "run", tmp_path / "cache", "cpu_ddp", env=env).run())
    assert time.monotonic() - started > 8 + 2 * 5  # the delays did happen
    assert "Timed out" not in result.stderr and checkpoint_steps(tmp_path / "run")[-1] == 4


@pytest.mark.slow
def test_the_launch_path_gives_a_slow_save_time_to_finish_after_the_launchers_sigterm(tmp_path, cache_dir):
    """torchrun SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after passing on a SIGTERM: too short a value
    loses the stop checkpoint; the one measured from this output dir's earlier run keeps it."""
    out = tmp_path / "run"
    args = [*TINY_LM, "--max_train_samples", "72", "--checkpointing_steps", "100", "--eval_steps", "100"]
    slow = {"RESUMABLE_DELAY": "rank0_commit:3"}
    Run([*args, "--max_steps_per_run", "3"], out, cache_dir, "cpu_ddp", env=slow).run_expecting(1)
    assert json.loads((out / "run_status.json").read_text())["status"] == "requeue"
    timeout = shutdown_timeout(out)
    assert timeout >= 2 * 3 + 10
    cli = subprocess.run([PYTHON, "-m", "resumable.signal_lead", "--shutdown-timeout", str(out)], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert cli.stdout.strip() == str(timeout)

    def stop_launcher(shutdown: int) -> int:
        """SIGTERM to the launcher alone, as scancel or `kill` of `make train-ddp` does; returns the step then."""
        run = Run(args, out, cache_dir, "cpu_ddp", env={**slow, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown)})
        before = logged_steps(out)[-1]
        run.start()
        run.wait_for_step(before + 2)
        run.proc.send_signal(signal.SIGTERM)
        run.proc.communicate(timeout=120)
        return logged_steps(out)[-1]

    assert stop_launcher(1) not in checkpoint_steps(out)  # killed while rank 0 was still committing
    step = stop_launcher(timeout)
    assert step in checkpoint_steps(out)  # stopped at that step and committed it
    status = json.loads((out / "run_status.json").read_text())
    assert (status["status"], status["step"]) == ("requeue", step)


@pytest.mark.slow
def test_a_two_process_resume_hashes_the_checkpoint_once(tmp_path, cache_dir):
    out = tmp_path / "run"
    Run([*TINY_LM, "--max_steps_per_run", "5"], out, cache_dir, "cpu_ddp").run()
    newest = f"step-{checkpoint_steps(out)[-1]:08d}"
    result = ok(Run([*TINY_LM, "--log_level", "debug"], out, cache_dir, "cpu_ddp").run())
    lines = (result.stdout + result.stderr).splitlines()
    verified = [ln for ln in lines if f"verified {newest}: sha256" in ln]
    assert len(verified) == 1 and "[rank" not in verified[0], verified  # rank 0's verdict, shared


@pytest.mark.slow
def test_bad_data_found_by_rank_0_in_its_turn_stops_every_rank_with_one_line(tmp_path, cache_dir):
    (tmp_path / "train.csv").write_text("text,label\n")  # a header and no rows
    args = [*TINY_LM, "--train_file", str(tmp_path / "train.csv")]
    result = Run(args, tmp_path / "run", cache_dir, "cpu_ddp").run()
    assert result.returncode != 0
    line = f"--train_file {tmp_path / 'train.csv'}: no examples (the file has no data rows)"
    # the two processes' stderr can interleave on one line: find the messages, not the lines
    errors = re.findall(r"error: (?:rank 0 failed preparing the data: )?--train_file \S+: no examples \([^)]*\)",
                        result.stderr)  # fmt: skip
    assert sorted(errors) == sorted([f"error: {line}", f"error: rank 0 failed preparing the data: {line}"]), errors
    assert result.stderr.count("error:") == 2
    assert 'train.py", line' not in result.stderr  # no traceback of ours (torchrun prints its own summary)

"""Shared fixtures: run the real scripts in new processes, kill them like the world does, compare bitwise."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore must never probe the cloud metadata address from tests
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TRAIN = str(REPO / "scripts" / "train.py")

# A model and data small enough that a run takes seconds. Odd batches per epoch (36 blocks / 4 = 9) on purpose.
TINY_LM = [
    "--config_overrides", "n_layer=1,n_embd=32,n_head=2",
    "--vocab_size", "512",
    "--block_size", "32",
    "--max_train_samples", "36",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--learning_rate", "0.003",
    "--warmup_steps", "3",
    "--num_train_epochs", "3",
    "--eval_steps", "5",
    "--checkpointing_steps", "4",
    "--report_to", "none",
    "--seed", "7",
]  # fmt: skip
TINY_CLS = [
    "--task", "sequence_classification",
    "--config_overrides", "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64",
    "--vocab_size", "512",
    "--max_seq_length", "48",
    "--max_train_samples", "36",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--learning_rate", "0.003",
    "--num_train_epochs", "3",
    "--eval_steps", "5",
    "--checkpointing_steps", "4",
    "--metric_for_best_model", "eval/f1",
    "--report_to", "none",
    "--seed", "7",
]  # fmt: skip

TINY_S2S = [
    "--task", "seq2seq",
    "--config_overrides", "num_layers=1,num_decoder_layers=1,num_heads=2,d_model=32,d_kv=16,d_ff=64",
    "--vocab_size", "512",
    "--max_source_length", "64",
    "--max_target_length", "16",
    "--generation_max_length", "8",
    "--eval_generate_samples", "6",
    "--max_train_samples", "36",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--learning_rate", "0.003",
    "--num_train_epochs", "3",
    "--eval_steps", "5",
    "--checkpointing_steps", "4",
    "--metric_for_best_model", "eval/rougeL",
    "--report_to", "none",
    "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One corpus/tokenizer/dataset cache for the whole session (built once, like a user's ~/.cache)."""
    return tmp_path_factory.mktemp("cache")


class Run:
    """A training command run in new processes, tagged so that every process it spawns can be found and killed."""

    def __init__(
        self,
        args: list[str],
        output_dir: Path,
        cache: Path,
        launcher: str = "python",
        env: dict | None = None,
        launch_args: tuple[str, ...] = (),
    ):
        self.output_dir = Path(output_dir)
        self.tag = uuid.uuid4().hex
        self.env = {**os.environ, "RESUMABLE_TEST_TAG": self.tag, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("ACCELERATE_USE_CPU", None)  # the launch config alone must make DDP real
        full = [*args, "--output_dir", str(output_dir), "--cache_dir", str(cache)]
        if launcher == "python":
            self.cmd = [PYTHON, TRAIN, *full]
        else:
            cfg = REPO / "accelerate_configs" / f"{launcher}.yaml"
            self.cmd = [ACCELERATE, "launch", "--config_file", str(cfg), *launch_args, TRAIN, *full]

    def run(self, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def run_expecting(self, code: int, timeout: float = 300) -> subprocess.CompletedProcess:
        result = self.run(timeout)
        assert result.returncode == code, f"rc={result.returncode}, wanted {code}\n{result.stderr[-5000:]}"
        return result

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        return self.proc

    def pids(self) -> list[int]:
        """Every live process carrying this run's tag (launcher and workers; torchrun puts workers in new sessions)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if f"RESUMABLE_TEST_TAG={self.tag}".encode() in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        """Block until the training log shows optimizer step `step` (or the run ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if logged_steps(self.output_dir) and logged_steps(self.output_dir)[-1] >= step:
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"run ended (rc={self.proc.returncode}) before step {step}:\n{self.proc.stdout.read()}"
                )
            time.sleep(0.005)
        raise AssertionError(f"step {step} not reached in {timeout}s")

    def kill_at_step(self, step: int) -> None:
        """SIGKILL every process of the run as soon as `step` is logged: no handler, no cleanup, like an OOM kill."""
        self.start()
        self.wait_for_step(step)
        self.signal_all(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for _ in range(200):  # orphaned workers must be gone before a resume starts beside them
            if not self.pids():
                break
            self.signal_all(signal.SIGKILL)
            time.sleep(0.05)
        assert not self.pids()


def logged_steps(output_dir: Path) -> list[int]:
    return [r["step"] for r in train_records(output_dir)]


def train_records(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def assert_bitwise_same_run(a: Path, b: Path) -> None:
    """Same per-step losses and learning rates (exact floats) and bitwise-equal final weights."""
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    assert [r["train/loss"] for r in rb] == [r["train/loss"] for r in ra]
    assert [r["lr"] for r in rb] == [r["lr"] for r in ra]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def checkpoint_steps(output_dir: Path) -> list[int]:
    folder = Path(output_dir) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "manifest.json").exists())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result

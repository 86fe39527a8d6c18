"""The committed v1 checkpoint (tests/fixtures/checkpoint_v1): the command that made it, and a private copy of it.

Its data and tokenizer are committed beside it, so every machine rebuilds exactly the data fingerprint the
checkpoint records (the paths are relative: run from the repository root).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1"
STEP = "step-00000003"
_REL = "tests/fixtures/checkpoint_v1"
FIXTURE_ARGS = [
    "--train_file", f"{_REL}/train.txt",
    "--validation_file", f"{_REL}/validation.txt",
    "--tokenizer_name", f"{_REL}/tokenizer",
    "--config_overrides", "n_layer=1,n_embd=16,n_head=2",
    "--block_size", "32",
    "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2",
    "--max_steps", "6",
    "--eval_steps", "3",
    "--checkpointing_steps", "3",
    "--report_to", "none",
    "--seed", "7",
]  # fmt: skip


def copy_fixture_run(dest: Path) -> Path:
    """A private copy of the fixture's output dir (stopped after step 3, its evaluation pending)."""
    shutil.copytree(FIXTURE / "run", dest)
    return dest

"""The checkpoint store: every kind of corruption is detected, resume falls back, loading never unpickles code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import REPO, TINY_LM, Run, ok

from resumable.checkpoint import (
    MANIFEST,
    _sha256,
    find_latest_checkpoint,
    list_checkpoints,
    manifest_digest,
    verify_checkpoint,
)
from resumable.errors import UserError

DDP_ARGS = [*TINY_LM, "--max_train_samples", "72", "--max_steps", "8", "--checkpointing_steps", "4", "--keep_best", "0"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir) -> Path:
    """A 2-process run with complete checkpoints at steps 4 and 8 (so rank 1 has its own RNG file)."""
    out = tmp_path_factory.mktemp("ddp_run")
    ok(Run(DDP_ARGS, out, cache_dir, launcher="cpu_ddp").run())
    return out


@pytest.fixture
def store(ddp_run, tmp_path) -> Path:
    """A private copy of the run's checkpoints folder to damage."""
    shutil.copytree(ddp_run / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl",
         "progress.json", MANIFEST]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, flip_bit, delete], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", FILES)
def test_corrupted_newest_checkpoint_is_skipped_with_a_warning_naming_the_file(store, name, damage, caplog):
    newest = store / "step-00000008"
    damage(newest / name)
    reason = verify_checkpoint(newest)
    assert reason is not None and name in reason
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert find_latest_checkpoint(store) == store / "step-00000004"
    assert any(name in r.getMessage() and "step-00000008" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_stale_temporary_folder_is_never_resumed(store):
    shutil.copytree(store / "step-00000008", store / ".tmp-step-00000012")
    (store / ".tmp-step-00000012" / MANIFEST).unlink()
    assert find_latest_checkpoint(store) == store / "step-00000008"


@pytest.mark.slow
def test_manifest_naming_a_path_outside_its_folder_is_rejected(store):
    folder = store / "step-00000008"
    manifest = json.loads((folder / MANIFEST).read_text())
    outside = store / "step-00000004" / "optimizer.bin"
    manifest["files"]["../step-00000004/optimizer.bin"] = {"size": outside.stat().st_size, "sha256": _sha256(outside)}
    manifest["manifest_sha256"] = manifest_digest(manifest)  # a well-formed, self-consistent manifest
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert "outside its folder" in verify_checkpoint(folder)
    assert find_latest_checkpoint(store) == store / "step-00000004"


@pytest.mark.slow
def test_all_checkpoints_invalid_is_an_error_not_a_fresh_start(store):
    for folder in store.glob("step-*"):
        flip_bit(folder / "model.safetensors")
    with pytest.raises(UserError, match="none is valid"):
        find_latest_checkpoint(store)


class Payload:
    """Unpickling this runs a shell command: what an attacker would plant in a shared checkpoint folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(folder: Path, name: str, marker: Path) -> None:
    """Replace `name` with a malicious pickle and re-sign the manifest, so only safe loading can stop it."""
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_planted_pickle_is_never_executed_on_resume(ddp_run, tmp_path, cache_dir, name):
    out = tmp_path / "run"
    shutil.copytree(ddp_run, out)
    (out / "COMPLETE").unlink()
    marker = tmp_path / "pwned"
    plant(out / "checkpoints" / "step-00000008", name, marker)
    result = Run([*DDP_ARGS, "--max_steps", "12"], out, cache_dir).run()  # 1 process: elastic path included
    assert not marker.exists(), "the payload ran"
    assert result.returncode == 2 and "could not load the training state" in result.stderr
    assert "Traceback" not in result.stderr


def test_our_code_never_unpickles():
    """Our own state is JSON and safetensors; torch.load only ever with weights_only=True."""
    for path in [*REPO.glob("src/resumable/*.py"), *REPO.glob("scripts/*.py")]:
        text = path.read_text()
        assert "weights_only=False" not in text and "pickle.load" not in text, path


@pytest.mark.slow
def test_changed_architecture_or_task_fails_listing_the_mismatched_fields(ddp_run, tmp_path, cache_dir):
    out = tmp_path / "run"
    shutil.copytree(ddp_run, out)
    (out / "COMPLETE").unlink()
    args = [*DDP_ARGS, "--max_steps", "12", "--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--seed", "8"]
    result = Run(args, out, cache_dir).run()
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "trained with different settings" in line and "config_overrides" in line and "seed" in line
    assert "task" not in line.split("settings:")[1].split("(")[0]  # only what differs is listed


def test_checkpoints_sort_by_step_in_name_order():
    from resumable.checkpoint import step_name

    names = [step_name(s) for s in (5, 40, 300, 1200, 99999999)]
    assert names == sorted(names) and names[0] == "step-00000005"


def test_commit_makes_a_verifiable_checkpoint_and_a_flipped_byte_is_caught(tmp_path):
    """commit_checkpoint makes any folder of files a verifiable checkpoint; a byte change is caught."""
    from resumable.checkpoint import commit_checkpoint

    tmp = tmp_path / ".tmp-step-00000001"
    tmp.mkdir()
    (tmp / "progress.json").write_text("{}")
    (tmp / "weights.bin").write_bytes(os.urandom(1000))
    commit_checkpoint(tmp, tmp_path / "step-00000001", 1, {})
    assert not tmp.exists() and verify_checkpoint(tmp_path / "step-00000001") is None
    flip_bit(tmp_path / "step-00000001" / "weights.bin")
    assert "sha256 mismatch" in verify_checkpoint(tmp_path / "step-00000001")
    assert verify_checkpoint(tmp_path / "step-00000001", deep=False) is None  # size-only check misses a bit flip


def test_a_symlinked_file_or_folder_in_a_checkpoint_is_refused(store, tmp_path):
    """A re-signed manifest cannot smuggle in files from elsewhere through a link (scanners would not follow it)."""
    newest = list_checkpoints(store)[-1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(newest / "optimizer.bin", elsewhere / "optimizer.bin")
    (newest / "optimizer.bin").symlink_to(elsewhere / "optimizer.bin")
    assert "optimizer.bin is a symbolic link" in verify_checkpoint(newest)


def test_a_deep_verification_is_not_repeated_for_unchanged_files_but_is_for_changed_ones(store):
    newest = list_checkpoints(store)[-1]
    assert verify_checkpoint(newest) is None
    assert verify_checkpoint(newest) is None  # remembered: same files, same inodes, same times
    flip_bit(newest / "optimizer.bin")  # changes its mtime/ctime: hashed again
    assert "optimizer.bin sha256 mismatch" in verify_checkpoint(newest)

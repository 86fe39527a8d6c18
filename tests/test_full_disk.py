"""A full disk or an unwritable output dir: one line, exit 74, every earlier checkpoint intact, and the same command
resumes once there is room. Tested on real size-capped (and read-only) tmpfs mounts, which need root."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from checkpoint_fixture import FIXTURE, FIXTURE_ARGS, STEP
from conftest import TINY_LM, Run, train_records
from safetensors.torch import save_file

from resumable.checkpoint import MANIFEST, Progress, amend_checkpoint, commit_checkpoint, verify_checkpoint
from resumable.disk import check_output_dir_writable, disk_full_exits, is_disk_full
from resumable.errors import EnvironmentFailure, UserError

PAGE = os.sysconf("SC_PAGE_SIZE")


def mount(path: Path, options: str) -> None:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size: int, *options: str):
    """A tmpfs of `size` bytes mounted at `path` for the block; skipped (with the reason) when that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-capped tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mount(path, ",".join([f"size={size // 1024}k", *options]))
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a process still holds it: detach


def remount(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size // 1024}k", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write until the filesystem is full; return the filler file (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * PAGE)
    return filler


def on_disk(folder: Path) -> int:
    """Bytes the files of `folder` take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.iterdir() if p.is_file())


def error_text(stderr: str) -> str:
    """The text of the single `error:` line (the progress bar may precede it on the same terminal line)."""
    assert stderr.count("error:") == 1, stderr[-3000:]
    return stderr.split("error:", 1)[1].split("\n", 1)[0].strip()


@pytest.mark.slow
@pytest.mark.parametrize("writer", [[], ["--async_save"]], ids=["sync", "async"])
def test_a_full_disk_during_a_save_stops_in_one_line_and_the_run_resumes_once_there_is_room(
    tmp_path, cache_dir, writer
):
    """Room for the step-3 checkpoint and a half of another: the step-6 save fails half-way through (with
    --async_save in the background: the run's last save is waited for, its error is the run's)."""
    checkpoint = on_disk(FIXTURE / "run" / "checkpoints" / STEP)  # the same model and optimizer as this run's
    with tmpfs(tmp_path / "disk", checkpoint * 3 // 2 + 8 * PAGE) as disk:
        out = disk / "run"
        run = Run([*FIXTURE_ARGS, *writer], out, cache_dir)  # the cache is not on the small disk
        result = run.run_expecting(74)
        line = error_text(result.stderr)
        assert line.startswith(
            f"no space left on device while saving checkpoint step-00000006 to {out / 'checkpoints'}"
        )
        assert (
            "needs about " in line and "kB free" in line and "the previous checkpoint step-00000003 is intact" in line
        )
        assert line.endswith("free space and run the same command to resume")
        assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
        # no half checkpoint: the temporary folder is gone and the earlier checkpoint verifies
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
        assert verify_checkpoint(out / "checkpoints" / "step-00000003") is None
        assert not (out / "COMPLETE").exists()

        remount(disk, 4 * checkpoint + 4 * 2**20)  # room for two more checkpoints and the final model
        result = run.run_expecting(0)
        assert f"Resuming from {out / 'checkpoints' / 'step-00000003'}" in result.stderr + result.stdout
        assert (out / "COMPLETE").exists() and [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]
        assert verify_checkpoint(out / "checkpoints" / "step-00000006") is None


def test_a_full_disk_while_recording_an_evaluation_leaves_the_checkpoint_as_it_was(tmp_path):
    with tmpfs(tmp_path / "disk", 32 * PAGE) as disk:
        folder, tmp = disk / "checkpoints" / "step-00000001", disk / "checkpoints" / ".tmp-step-00000001"
        tmp.mkdir(parents=True)
        (tmp / "progress.json").write_text(json.dumps(asdict(Progress(step=1))))
        (tmp / "model.safetensors").write_bytes(os.urandom(4 * PAGE))
        commit_checkpoint(tmp, folder, 1, {})
        before = (folder / MANIFEST).read_text()
        filler = fill(disk)
        evaluated = Progress(step=1, last_eval={"eval/loss": 1.5}, last_eval_step=1)
        with pytest.raises(EnvironmentFailure, match="no space left on device while recording an evaluation") as err:
            amend_checkpoint(folder, evaluated)
        assert err.value.exit_code == 74 and "step-00000001 is intact" in str(err.value)
        assert (folder / MANIFEST).read_text() == before and verify_checkpoint(folder) is None
        assert sorted(p.name for p in folder.parent.iterdir()) == ["step-00000001"]  # no .tmp- folder left
        filler.unlink()
        amend_checkpoint(folder, evaluated)  # with room, the same call records it
        assert json.loads((folder / MANIFEST).read_text())["metrics"] == {"eval/loss": 1.5}


def test_every_writer_s_way_of_saying_the_disk_is_full_is_recognised(tmp_path):
    """Python's OSError(ENOSPC), safetensors' error, and torch's zip writer, which drops the errno."""
    tensors = {"w": torch.zeros(64 * PAGE // 4)}  # larger than the disk
    with tmpfs(tmp_path / "disk", 16 * PAGE) as disk:
        writers = {
            "open": lambda: (disk / "a.json").write_text("x" * 64 * PAGE),
            "safetensors": lambda: save_file(tensors, str(disk / "b.safetensors")),
            "torch.save": lambda: torch.save(tensors, disk / "c.bin"),
        }
        for name, write in writers.items():
            with pytest.raises(Exception) as err:
                write()
            assert is_disk_full(err.value), f"{name}: {err.value!r}"
            for leftover in disk.iterdir():
                leftover.unlink()
    assert not is_disk_full(RuntimeError("shape mismatch")) and not is_disk_full(PermissionError(errno.EACCES, "no"))


def test_a_full_disk_anywhere_in_a_script_becomes_one_line_naming_the_file(tmp_path):
    with tmpfs(tmp_path / "disk", 4 * PAGE) as disk:

        @disk_full_exits
        def main() -> int:
            with open(disk / "train_log.jsonl", "w") as fh:
                fh.write("x" * 8 * PAGE)
            return 0

        with pytest.raises(EnvironmentFailure) as err:
            main()
        assert str(err.value).startswith(f"no space left on device while writing {disk / 'train_log.jsonl'}")

    @disk_full_exits
    def shared_memory_full() -> int:  # a DataLoader worker's /dev/shm: not the output dir, so it is not blamed
        raise RuntimeError("unable to write to file </torch_123_456_0>: No space left on device (28)")

    with pytest.raises(EnvironmentFailure, match=r"^no space left on device: unable to write to file </torch_123"):
        shared_memory_full()

    @disk_full_exits
    def other_failure() -> int:
        raise ValueError("not about space")

    with pytest.raises(ValueError):
        other_failure()


def test_a_writable_output_dir_passes_and_nothing_is_left_behind(tmp_path):
    check_output_dir_writable(tmp_path)
    check_output_dir_writable(tmp_path / "not" / "yet" / "made")  # probed in the folder it will be made in
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_that_is_a_file_is_bad_input(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(UserError, match="exists and is not a directory") as err:
        check_output_dir_writable(tmp_path / "run")
    assert err.value.exit_code == 2


def test_a_read_only_output_dir_fails_in_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", 4 * PAGE, "ro") as ro:
        for path in (ro, ro / "run"):
            with pytest.raises(EnvironmentFailure, match=f"--output_dir {path}: not writable") as err:
                check_output_dir_writable(path)
            assert "Read-only file system" in str(err.value) and err.value.exit_code == 74
        assert "cannot create it in" in str(err.value)


def test_an_immutable_output_dir_fails_in_one_line(tmp_path):
    """Root may write anywhere its permissions say no; an immutable folder (chattr +i) still refuses it."""
    folder = tmp_path / "run"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with pytest.raises(EnvironmentFailure, match="not writable: Operation not permitted"):
            check_output_dir_writable(folder)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_train_py_on_a_read_only_output_dir_exits_74_in_one_line_before_the_slow_start_up(tmp_path, cache_dir):
    with tmpfs(tmp_path / "ro", 4 * PAGE, "ro") as ro:
        result = Run(TINY_LM, ro / "run", cache_dir).run_expecting(74)
    assert error_text(result.stderr).startswith(f"--output_dir {ro / 'run'}: not writable (cannot create it in {ro})")
    assert "Traceback" not in result.stderr and "Data:" not in result.stderr  # nothing loaded first


def test_a_full_disk_under_train_log_is_exit_74_naming_it_not_a_logging_error_per_line(tmp_path):
    script = f"""
import sys
from pathlib import Path
from resumable.disk import disk_full_exits
from resumable.errors import exit_on_user_error
from resumable.logs import get_logger, log_to_file, setup_logging

@exit_on_user_error
@disk_full_exits
def main():
    setup_logging("info")
    log_to_file(Path({str(tmp_path / "disk" / "train.log")!r}))
    with open(Path({str(tmp_path / "disk" / "filler")!r}), "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\\0" * 4096)
        except OSError:
            pass
    for i in range(100):
        get_logger("resumable.test").info("a line of the run " * 20)
main()
"""
    with tmpfs(tmp_path / "disk", 8 * PAGE):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 74, result.stderr[-3000:]
    assert error_text(result.stderr).startswith(f"no space left on device while writing {tmp_path / 'disk'}/train.log")
    assert "Logging error" not in result.stderr and "Traceback" not in result.stderr


def test_a_finished_run_on_a_read_only_mount_is_still_already_complete(tmp_path, cache_dir):
    with tmpfs(tmp_path / "disk", 64 * 2**20) as disk:
        Run([*TINY_LM, "--max_steps", "2"], disk / "run", cache_dir).run_expecting(0)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = Run([*TINY_LM, "--max_steps", "2"], disk / "run", cache_dir).run_expecting(0)
    assert "already complete" in result.stderr and "Traceback" not in result.stderr

"""Checkpoint format versions: the committed format-1 checkpoint keeps resuming and exporting; a newer format is
refused in one line, never skipped for an older checkpoint and never misread."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from checkpoint_fixture import FIXTURE, FIXTURE_ARGS, STEP, copy_fixture_run
from conftest import PYTHON, REPO, Run, ok, train_records
from safetensors.torch import load_file

from resumable.checkpoint import FORMAT, MANIFEST, find_latest_checkpoint, manifest_digest, verify_checkpoint
from resumable.errors import UserError

SCRIPT = str(REPO / "scripts" / "checkpoints.py")


def rewrite_manifest(folder: Path, sign: bool = True, **changes) -> None:
    """Change manifest fields (None deletes one) and, with `sign`, re-sign it as its writer would have."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    if sign:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def checkpoints_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """scripts/checkpoints.py in a new process, from the repository root (the fixture's recorded paths are relative)."""
    cmd = [PYTHON, SCRIPT, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_fixture_is_a_valid_format_1_checkpoint_of_a_few_hundred_kb():
    folder = FIXTURE / "run" / "checkpoints" / STEP
    assert verify_checkpoint(folder) is None
    assert json.loads((folder / MANIFEST).read_text())["format"] == 1
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 400_000


@pytest.mark.slow
def test_the_format_1_fixture_resumes_and_finishes(tmp_path, cache_dir):
    out = copy_fixture_run(tmp_path / "run")
    result = Run(FIXTURE_ARGS, out, cache_dir).run_expecting(0)
    assert f"Resuming from {out / 'checkpoints' / STEP}: step 3" in result.stderr + result.stdout
    assert (out / "COMPLETE").exists() and (out / "final" / "model.safetensors").is_file()
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # each step once: nothing redone, nothing lost
    assert all(0 < r["train/loss"] < 20 for r in records)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(r["step"] == 3 and "eval/loss" in r for r in log), "the pending step-3 evaluation ran first"
    # the amended step-3 checkpoint (its evaluation recorded) and the new one both verify, still format 1
    for step in ("step-00000003", "step-00000006"):
        folder = out / "checkpoints" / step
        assert verify_checkpoint(folder) is None
        assert json.loads((folder / MANIFEST).read_text())["format"] == 1


@pytest.mark.slow
def test_the_format_1_fixture_exports_a_model_with_its_weights(tmp_path):
    folder = FIXTURE / "run" / "checkpoints" / STEP
    ok(checkpoints_cli("export", folder, "--to", tmp_path / "exported"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    saved, state = load_file(str(folder / "model.safetensors")), model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    assert len(AutoTokenizer.from_pretrained(tmp_path / "exported")) == model.config.vocab_size


def test_a_manifest_without_a_format_field_is_format_1(tmp_path):
    out = copy_fixture_run(tmp_path / "run")
    folder = out / "checkpoints" / STEP
    rewrite_manifest(folder, format=None)  # as written before the field existed
    assert "format" not in json.loads((folder / MANIFEST).read_text())
    assert verify_checkpoint(folder) is None
    assert find_latest_checkpoint(out / "checkpoints") == folder


def newer(tmp_path: Path) -> Path:
    """The fixture's run with its checkpoint claiming the next format (an intact, re-signed manifest)."""
    out = copy_fixture_run(tmp_path / "run")
    rewrite_manifest(out / "checkpoints" / STEP, format=FORMAT + 1)
    return out


def test_a_newer_format_is_refused_on_resume_naming_the_folder_and_both_versions(tmp_path, cache_dir):
    out = newer(tmp_path)
    result = Run(FIXTURE_ARGS, out, cache_dir).run_expecting(2)
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out / 'checkpoints' / STEP}: checkpoint format {FORMAT + 1} is newer")
    assert f"(format {FORMAT})" in line and "upgrade resumable" in line
    assert not (out / "COMPLETE").exists() and sorted(p.name for p in (out / "checkpoints").iterdir()) == [STEP]


def test_a_newer_format_is_never_skipped_for_an_older_checkpoint(tmp_path):
    """Skipping it would silently resume from older work and then overwrite the newer run's line of checkpoints."""
    out = newer(tmp_path)
    older = out / "checkpoints" / "step-00000001"
    copy_fixture_run(tmp_path / "other")
    (tmp_path / "other" / "checkpoints" / STEP).rename(older)
    rewrite_manifest(older, step=1)
    assert verify_checkpoint(older) is None
    with pytest.raises(UserError, match=f"format {FORMAT + 1} is newer"):
        find_latest_checkpoint(out / "checkpoints")


def test_a_corrupted_manifest_claiming_a_newer_format_counts_as_corrupted(tmp_path):
    out = copy_fixture_run(tmp_path / "run")
    folder = out / "checkpoints" / STEP
    rewrite_manifest(folder, sign=False, format=FORMAT + 2)  # e.g. a flipped bit in the digit
    reason = verify_checkpoint(folder)
    assert "checksum mismatch (corrupted" in reason and f"format {FORMAT + 2}" in reason
    with pytest.raises(UserError, match="none is valid"):  # skipped as corrupted, not refused as newer
        find_latest_checkpoint(out / "checkpoints")


@pytest.mark.parametrize("command", ["verify", "list", "inspect", "export"])
def test_the_checkpoints_cli_refuses_a_newer_format_with_exit_1(tmp_path, command):
    out = newer(tmp_path)
    folder = out / "checkpoints" / STEP
    args = {"verify": [out], "list": [out], "inspect": [folder], "export": [folder, "--to", tmp_path / "x"]}[command]
    result = checkpoints_cli(command, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    said = f"checkpoint format {FORMAT + 1} is newer than this version of resumable reads (format {FORMAT})"
    if command in ("inspect", "export"):  # refused in one line, nothing summarised or written
        assert result.stdout == "" and result.stderr == f"error: {folder}: {said}; upgrade resumable to use it\n"
        assert not (tmp_path / "x").exists()
    else:
        assert said in result.stdout
    if command == "verify":
        assert f"{STEP}  UNREADABLE: " in result.stdout

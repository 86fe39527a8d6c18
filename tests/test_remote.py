"""A remote output_dir: push and pull checkpoints through a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest
from conftest import TINY_LM, Run, ok

from resumable.checkpoint import MANIFEST, verify_checkpoint
from resumable.errors import UserError
from resumable.remote import RemoteMirror, is_remote, staging_dir
from resumable.retention import RetentionPolicy, best_checkpoint

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "runs"
S4, S8 = "step-00000004", "step-00000008"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 in a thread on a loopback port; credentials and endpoint through the standard variables."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)  # one INFO line per request otherwise
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before these variables would keep its endpoint
        fs = s3fs.S3FileSystem()
        if not fs.exists(BUCKET):  # moto keeps its buckets per process: another module's server may have made it
            fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def url(s3) -> str:
    return f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A finished tiny run with checkpoints at steps 4 and 8 (and 5, the best one), final/, COMPLETE."""
    out = tmp_path_factory.mktemp("trained")
    ok(Run([*TINY_LM, "--max_steps", "8", "--checkpointing_steps", "4"], out, cache_dir).run())
    assert (out / "checkpoints" / S4).is_dir() and (out / "checkpoints" / S8).is_dir()
    return out


def _push_all(url: str, trained: Path) -> None:
    mirror = RemoteMirror(url, trained)
    for name in (S4, S8):
        mirror.push_checkpoint(trained / "checkpoints" / name)
    mirror.push_file("train_log.jsonl")


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_is_remote_and_staging_dir(tmp_path):
    assert is_remote("s3://bucket/run") and is_remote("gs://bucket/run") and is_remote("memory://x")
    assert not is_remote("file:///tmp/run") and not is_remote("/tmp/run") and not is_remote("outputs/run")
    assert not is_remote("C:\\runs\\x")
    a = staging_dir("s3://bucket/run", tmp_path)
    assert a == staging_dir("s3://bucket/run/", tmp_path) and a.parent == tmp_path / "staging"
    assert a != staging_dir("s3://bucket/run2", tmp_path)
    with pytest.raises(UserError, match="nosuchproto://x"):
        RemoteMirror("nosuchproto://x/run", tmp_path)


@pytest.mark.slow
def test_round_trip_is_byte_identical(url, trained, tmp_path, s3, monkeypatch):
    _push_all(url, trained)
    local = tmp_path / "staging"
    mirror = RemoteMirror(url, local)
    assert mirror.remote_checkpoints() == [S4, S8]
    assert mirror.pull_latest_valid() == S8
    _same_files(trained / "checkpoints" / S8, local / "checkpoints" / S8)
    assert verify_checkpoint(local / "checkpoints" / S8) is None
    assert (local / "train_log.jsonl").read_bytes() == (trained / "train_log.jsonl").read_bytes()
    assert sorted(p.name for p in (local / "checkpoints").iterdir()) == [S8]  # no temporary folder left

    # a second pull (another process on the node, a rerun) finds the checkpoint in place: only the small files move
    real_get = mirror.fs.get_file

    def no_checkpoint_download(rpath, lpath, *args, **kwargs):
        assert "/checkpoints/" not in rpath, f"downloaded {rpath} again"
        return real_get(rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "get_file", no_checkpoint_download)
    assert mirror.pull_latest_valid() == S8


@pytest.mark.slow
def test_a_resume_pulls_train_log_only_when_missing_here_the_local_one_is_never_older(url, trained, tmp_path, s3):
    _push_all(url, trained)
    RemoteMirror(url, trained).push_file("train.log")
    fresh = tmp_path / "new_machine"
    RemoteMirror(url, fresh).pull_latest_valid()
    assert (fresh / "train.log").read_bytes() == (trained / "train.log").read_bytes()  # a new machine gets it
    same = tmp_path / "same_machine"  # after the last push: the stop line, an error line
    shutil.copytree(trained, same)
    with open(same / "train.log", "a") as fh:
        fh.write("2026-12-02 10:00:00 ERROR error: logged after the last push\n")
    RemoteMirror(url, same).pull_latest_valid()
    assert (same / "train.log").read_text().endswith("ERROR error: logged after the last push\n")


@pytest.mark.slow
def test_upload_killed_half_way_is_skipped(url, trained, tmp_path, s3, monkeypatch, caplog):
    mirror = RemoteMirror(url, trained)
    mirror.push_checkpoint(trained / "checkpoints" / S4)
    real_put, done = mirror.fs.put_file, []

    def dies_after_two(lpath, rpath, *args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt("killed mid-upload")  # not an OSError: no retry, like a SIGKILL
        done.append(rpath)
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "put_file", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        mirror.push_checkpoint(trained / "checkpoints" / S8)
    assert len(s3.ls(f"{url}/checkpoints/{S8}")) == 2  # data files there, no manifest
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert RemoteMirror(url, tmp_path / "a").pull_latest_valid() == S4
    assert f"{S8}: {MANIFEST} missing" in _warnings(caplog)
    assert not (tmp_path / "a" / "checkpoints" / S8).exists()


@pytest.mark.slow
def test_manifest_naming_a_missing_file_is_skipped(url, trained, tmp_path, s3, caplog):
    _push_all(url, trained)
    s3.rm(f"{url}/checkpoints/{S8}/scheduler.bin")
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert RemoteMirror(url, tmp_path / "a").pull_latest_valid() == S4
    assert f"{S8}: scheduler.bin missing" in _warnings(caplog)


@pytest.mark.slow
def test_corrupted_remote_file_is_skipped_naming_it(url, trained, tmp_path, s3, caplog):
    _push_all(url, trained)
    path = f"{url}/checkpoints/{S8}/optimizer.bin"
    data = bytearray(s3.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    s3.pipe_file(path, bytes(data))
    local = tmp_path / "a"
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert RemoteMirror(url, local).pull_latest_valid() == S4
    assert f"{S8}: optimizer.bin sha256 mismatch" in _warnings(caplog)
    assert sorted(p.name for p in (local / "checkpoints").iterdir()) == [S4]  # the bad download was thrown away
    _same_files(trained / "checkpoints" / S4, local / "checkpoints" / S4)


@pytest.mark.slow
def test_invalid_local_copy_is_replaced_by_the_remote_one(url, trained, tmp_path):
    _push_all(url, trained)
    local = tmp_path / "a"
    shutil.copytree(trained / "checkpoints" / S8, local / "checkpoints" / S8)
    (local / "checkpoints" / S8 / "model.safetensors").write_bytes(b"truncated")
    assert RemoteMirror(url, local).pull_latest_valid() == S8
    _same_files(trained / "checkpoints" / S8, local / "checkpoints" / S8)


@pytest.mark.slow
def test_delete_removes_the_manifest_first(url, trained, tmp_path, s3, monkeypatch, caplog):
    _push_all(url, trained)
    mirror = RemoteMirror(url, trained)
    real_rm = mirror.fs.rm

    def crash_on_folder(path, recursive=False, *args, **kwargs):
        if recursive:
            raise KeyboardInterrupt("killed between manifest and data delete")
        return real_rm(path, recursive, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "rm", crash_on_folder)
    with pytest.raises(KeyboardInterrupt):
        mirror.delete_remote([S8])
    left = {p.rsplit("/", 1)[-1] for p in s3.ls(f"{url}/checkpoints/{S8}", refresh=True)}
    assert "optimizer.bin" in left and MANIFEST not in left  # half-deleted: data without a manifest
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert RemoteMirror(url, tmp_path / "a").pull_latest_valid() == S4
    assert f"{S8}: {MANIFEST} missing" in _warnings(caplog)

    monkeypatch.setattr(mirror.fs, "rm", real_rm)
    mirror.delete_remote([S8])  # finishing the delete later works on what is left
    assert mirror.remote_checkpoints() == [S4]


@pytest.mark.slow
def test_prune_remote_applies_the_policy_to_remote_checkpoints(url, trained):
    _push_all(url, trained)
    mirror = RemoteMirror(url, trained)
    assert mirror.prune_remote(RetentionPolicy(keep_last=1, keep_best=0)) == [S4]
    assert mirror.remote_checkpoints() == [S8]


@pytest.mark.slow
def test_transient_errors_are_retried(url, trained, monkeypatch, caplog):
    mirror = RemoteMirror(url, trained, backoff_s=0)
    real_put, failures = mirror.fs.put_file, []

    def flaky(lpath, rpath, *args, **kwargs):
        if len(failures) < 2:
            failures.append(rpath)
            raise ConnectionResetError("connection reset by peer")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "put_file", flaky)
    with caplog.at_level(logging.WARNING, logger="resumable"):
        mirror.push_checkpoint(trained / "checkpoints" / S4)
    assert _warnings(caplog).count("retrying") == 2

    def denied(*args, **kwargs):
        failures.append(args)
        raise PermissionError("Access Denied")

    monkeypatch.setattr(mirror.fs, "put_file", denied)
    with pytest.raises(PermissionError):  # an answer, not an accident: no second try
        mirror.push_file("train_log.jsonl")
    assert len(failures) == 3
    monkeypatch.setattr(mirror.fs, "put_file", real_put)
    others = sorted(p.name for p in (trained / "checkpoints").glob("step-*") if p.name != S4)
    assert S8 in others and mirror.push_missing() == others  # S4's remote manifest matches: the rest go
    assert mirror.push_missing() == []


@pytest.mark.slow
def test_push_complete_sends_complete_last_and_a_pull_then_stops(url, trained, tmp_path, monkeypatch, s3):
    mirror = RemoteMirror(url, trained)
    real_put, order = mirror.fs.put_file, []

    def recording(lpath, rpath, *args, **kwargs):
        order.append(rpath[len(mirror.root) + 1 :])
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "put_file", recording)
    s3.pipe_file(f"{url}/final/stale.bin", b"from an older finish")
    mirror.push_complete()
    assert order[-1] == "COMPLETE" and "final/model.safetensors" in order and "final_metrics.json" in order
    final = sorted(p[len(mirror.root) + 1 :] for p in s3.find(f"{url}/final"))
    assert final == sorted(
        f"final/{p.relative_to(trained / 'final')}" for p in (trained / "final").rglob("*") if p.is_file()
    )
    assert mirror.is_complete()

    local = tmp_path / "a"
    assert RemoteMirror(url, local).pull_latest_valid() is None  # finished: nothing to resume
    assert (local / "COMPLETE").is_file() and not (local / "checkpoints").exists()


@pytest.mark.slow
def test_local_complete_not_on_the_remote_is_dropped(url, trained, tmp_path, caplog):
    _push_all(url, trained)
    local = tmp_path / "a"
    local.mkdir()
    (local / "COMPLETE").write_text("{}")  # the finish ran here but its push never got through
    with caplog.at_level(logging.WARNING, logger="resumable"):
        assert RemoteMirror(url, local).pull_latest_valid() == S8
    assert not (local / "COMPLETE").exists() and "finish again" in _warnings(caplog)


@pytest.mark.slow
def test_concurrent_pulls_on_one_node_download_once(url, trained, tmp_path, monkeypatch):
    """Every process of a node calls pull at start: the lock lets one download while the others wait."""
    _push_all(url, trained)
    local, results, downloads = tmp_path / "a", [], []
    mirrors = [RemoteMirror(url, local) for _ in range(3)]
    real_get = mirrors[0].fs.get_file  # one cached filesystem instance behind all three

    def counting(rpath, lpath, *args, **kwargs):
        downloads.append(rpath)
        return real_get(rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(mirrors[0].fs, "get_file", counting)
    threads = [threading.Thread(target=lambda m=m: results.append(m.pull_latest_valid())) for m in mirrors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [S8] * 3
    model_gets = [d for d in downloads if d.endswith(f"{S8}/model.safetensors")]
    assert len(model_gets) == 1
    _same_files(trained / "checkpoints" / S8, local / "checkpoints" / S8)


@pytest.mark.slow
def test_best_remote_matches_the_local_choice_and_pulls(url, trained, tmp_path):
    mirror = RemoteMirror(url, trained)
    mirror.push_missing()
    policy = RetentionPolicy(keep_best=1)
    expected = best_checkpoint(trained / "checkpoints", policy)
    assert expected is not None and mirror.best_remote(policy) == expected.name
    local = tmp_path / "a"
    assert RemoteMirror(url, local).pull_checkpoint(expected.name) is None
    _same_files(expected, local / "checkpoints" / expected.name)
    assert RemoteMirror(url, local).pull_checkpoint("step-00000099") == f"{MANIFEST} missing (incomplete upload)"


@pytest.mark.slow
def test_train_py_on_an_s3_output_dir_resumes_bitwise_on_a_fresh_machine(
    s3, url, tmp_path, tmp_path_factory, cache_dir
):
    """scripts/train.py --output_dir s3://...: stop, lose the local disk, run again: same result, all in the bucket."""
    from conftest import assert_bitwise_same_run
    from test_resume_exact import reference

    ref = reference(tmp_path_factory, cache_dir, TINY_LM)
    Run([*TINY_LM, "--max_steps_per_run", "13"], url, cache_dir).run_expecting(75)
    assert s3.exists(f"{url}/checkpoints/step-00000013/manifest.json")
    shutil.rmtree(staging_dir(url, cache_dir))  # a new machine: nothing local but the dataset cache
    result = ok(Run(TINY_LM, url, cache_dir).run())
    assert "Resuming from" in result.stdout + result.stderr and "step 13," in result.stdout + result.stderr
    assert s3.exists(f"{url}/COMPLETE")
    s3.get(f"{url}/train_log.jsonl", str(tmp_path / "train_log.jsonl"))
    s3.get(f"{url}/final/", str(tmp_path / "final"), recursive=True)
    assert_bitwise_same_run(ref, tmp_path)
    again = ok(Run(TINY_LM, url, cache_dir).run())
    assert "already complete" in again.stderr


@pytest.mark.slow
def test_checkpoints_cli_lists_verifies_and_prunes_a_remote_run(s3, url, trained, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setenv("RESUMABLE_CACHE", str(tmp_path / "cache"))
    _push_all(url, trained)
    s3.pipe(f"{url}/checkpoints/step-00000009/model.safetensors", b"half an upload")  # no manifest: incomplete

    def cli(*argv: str) -> int:
        monkeypatch.setattr("sys.argv", ["checkpoints.py", *argv])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "checkpoints.py"), run_name="__main__")
        return done.value.code

    assert cli("list", url) == 1  # listed, and the cut upload makes it exit 1 like verify
    listing = capsys.readouterr().out
    assert S4 in listing and S8 in listing and "step-00000009" in listing
    assert cli("verify", url) == 1  # the cut upload is reported
    assert "step-00000009  CORRUPT: remote" in capsys.readouterr().out
    assert cli("prune", url, "--keep", "1", "--keep_best", "1", "--yes") == 0
    assert not s3.exists(f"{url}/checkpoints/{S4}/manifest.json")  # no pool wanted step 4 (step 5 is best)
    assert s3.exists(f"{url}/checkpoints/{S8}/manifest.json")


@pytest.mark.slow
def test_deleting_the_remote_run_starts_over_instead_of_pushing_the_staging_copy_back(s3, url, cache_dir):
    ok(Run([*TINY_LM, "--max_steps", "6"], url, cache_dir).run())
    s3.rm(url, recursive=True)  # the user deletes the run to start over, with new hyperparameters
    result = ok(Run([*TINY_LM, "--max_steps", "5", "--learning_rate", "0.002"], url, cache_dir).run())
    assert "Resuming" not in result.stdout + result.stderr and "remote run was deleted" in result.stderr
    log = [json.loads(line) for line in s3.cat_file(f"{url}/train_log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads(s3.cat_file(f"{url}/COMPLETE"))["step"] == 5
    assert sorted(n.rsplit("/", 1)[-1] for n in s3.ls(f"{url}/checkpoints")) == ["step-00000004", "step-00000005"]


@pytest.mark.slow
def test_a_branch_on_an_s3_output_dir_sets_the_newer_remote_checkpoints_aside(s3, url, tmp_path, cache_dir):
    args = [*TINY_LM, "--max_steps", "20", "--eval_steps", "4"]
    Run([*args, "--max_steps_per_run", "18"], url, cache_dir).run_expecting(75)
    Run([*args, "--resume_from_checkpoint", "best", "--max_steps_per_run", "1"], url, cache_dir).run_expecting(75)
    best = json.loads(s3.cat_file(f"{url}/run_status.json"))["step"] - 1
    remote = sorted(int(n.rsplit("-", 1)[-1]) for n in s3.ls(f"{url}/checkpoints"))
    assert remote[-1] == best + 1 and 18 not in remote  # the abandoned line is not in checkpoints/ any more
    assert s3.exists(f"{url}/abandoned") and any(
        p.endswith("step-00000018/manifest.json") for p in s3.find(f"{url}/abandoned")
    )
    shutil.rmtree(staging_dir(url, cache_dir))  # a new machine: the default run continues the branch
    result = ok(Run(args, url, cache_dir).run())
    assert f"step-{best + 1:08d}: step {best + 1}," in result.stdout + result.stderr


def test_slurm_verdict_ignores_a_remote_status_left_by_an_earlier_attempt(s3, url, tmp_path):
    """common.sh can delete a stale local run_status.json, not one in the bucket: the attempt id must decide."""
    import os
    import subprocess

    from conftest import PYTHON, REPO

    stale = {"status": "requeue", "exit_code": 75, "step": 8, "attempt": "earlier-job"}
    s3.pipe_file(f"{url}/run_status.json", json.dumps(stale).encode())
    script = "source scripts/slurm/common.sh && finish 1"  # the launcher crashed before writing any status
    env = {**os.environ, "PATH": str(Path(PYTHON).parent) + ":/usr/bin:/bin", "REPO_DIR": str(REPO),
           "TRAIN_CONFIG": "", "OUTPUT_DIR": url, "SCRATCH": str(tmp_path), "SLURM_JOB_ID": "123"}  # fmt: skip
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "=== FAILURE: launcher exit 1" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1  # not 75: the job is not requeued for a crash

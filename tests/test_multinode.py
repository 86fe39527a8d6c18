"""Two "nodes" on one machine: two `accelerate launch --num_machines 2` rendezvousing on 127.0.0.1, each with its own
cache and staging folder (RESUMABLE_CACHE per node, as on a cluster with node-local scratch), an s3:// output dir."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import TINY_LM, Run, assert_bitwise_same_run, logged_steps
from test_remote import BUCKET, _free_port, s3  # noqa: F401 (the moto server fixture)

from resumable.remote import staging_dir

pytestmark = pytest.mark.slow
ARGS = [*TINY_LM, "--max_train_samples", "72"]  # 9 micro-batches per process per epoch, 27 steps


def nodes(args: list[str], url: str, caches: list[Path], env: dict | None = None) -> list[Run]:
    port = str(_free_port())
    return [
        Run(
            args,
            url,
            cache,
            "cpu_ddp",
            env=env,
            launch_args=(
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
            ),
        )  # fmt: skip
        for rank, cache in enumerate(caches)
    ]


def run_all(runs: list[Run], timeout: float = 300) -> list[tuple[int, str]]:
    for run in runs:
        run.start()
    outputs = [run.proc.communicate(timeout=timeout)[0] for run in runs]
    return [(run.proc.returncode, out) for run, out in zip(runs, outputs)]


def fetch_run(s3, url: str, dest: Path) -> Path:  # noqa: F811
    dest.mkdir(parents=True)
    s3.get(f"{url}/train_log.jsonl", str(dest / "train_log.jsonl"))
    s3.get(f"{url}/final/", str(dest / "final"), recursive=True)
    return dest


@pytest.fixture(scope="module")
def two_node_reference(s3, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("two-node-ref")
    url = f"s3://{BUCKET}/two-node-ref"
    results = run_all(nodes(ARGS, url, [base / "node0", base / "node1"]))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return fetch_run(s3, url, base / "fetched"), base


def test_a_node_killed_mid_run_resumes_bitwise_with_node_local_staging(s3, two_node_reference, tmp_path):  # noqa: F811
    """SIGKILL one node: both exit; re-run both: the final weights equal the uninterrupted two-node run's. Every
    rank's RNG reached the bucket although each node saved into its own staging folder; and rank 0's choice of
    checkpoint wins over a newer one that only node 1 sees."""
    ref, ref_base = two_node_reference
    url = f"s3://{BUCKET}/two-node-killed"
    caches = [tmp_path / "node0", tmp_path / "node1"]
    first = nodes(ARGS, url, caches)
    for run in first:
        run.start()
    staging0 = staging_dir(url, caches[0])
    deadline = time.monotonic() + 240
    while not (logged_steps(staging0) and logged_steps(staging0)[-1] >= 10):
        assert time.monotonic() < deadline and first[0].proc.poll() is None, first[0].proc.stdout.read()[-3000:]
        time.sleep(0.01)
    first[1].signal_all(signal.SIGKILL)  # node 1 dies like a machine that lost power
    for run in first:
        run.proc.communicate(timeout=120)  # node 0 notices (gloo: connection closed) and exits too
    assert first[0].proc.returncode != 0 and not s3.exists(f"{url}/COMPLETE")
    remote = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{url}/checkpoints"))
    newest = remote[-1]
    files = json.loads(s3.cat(f"{url}/checkpoints/{newest}/manifest.json"))["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files), sorted(files)
    # node 1's staging folder holds a newer checkpoint of the same run than rank 0 resumes from (a stale cache):
    # it must follow rank 0, not take it
    later = sorted((staging_dir(f"s3://{BUCKET}/two-node-ref", ref_base / "node0") / "checkpoints").glob("step-*"))[-1]
    assert int(later.name[5:]) > int(newest[5:])
    shutil.copytree(later, staging_dir(url, caches[1]) / "checkpoints" / later.name)

    # the bucket's copy is damaged, rank 0's own copy is intact: node 1 cannot get the checkpoint rank 0 chose, and
    # every rank stops with one line instead of node 1 resuming an older one
    weights = f"{url}/checkpoints/{newest}/model.safetensors"
    intact = s3.cat(weights)
    s3.pipe(weights, intact[:-1] + bytes([intact[-1] ^ 1]))
    refused = run_all(nodes(ARGS, url, caches))
    assert [rc != 0 for rc, _ in refused] == [True, True]
    line = f"error: rank 1 on {socket.gethostname()} cannot use {newest}, the checkpoint rank 0 resumes from"
    assert all(line in out for _, out in refused), refused[0][1][-3000:]
    assert "model.safetensors sha256 mismatch" in refused[1][1]
    assert all('train.py", line' not in out for _, out in refused)  # no traceback of ours (torchrun prints its own)
    s3.pipe(weights, intact)

    second = run_all(nodes([*ARGS, "--log_level", "debug"], url, caches))
    assert [rc for rc, _ in second] == [0, 0], second[0][1][-4000:] + second[1][1][-4000:]
    assert f"Resuming from {staging0 / 'checkpoints' / newest}" in second[0][1]
    # verified once per copy: rank 0's (in its staging folder), and node 1's pulled one
    verified = [
        ln for _, out in second for ln in out.splitlines() if "verified " in ln and newest in ln and "sha256" in ln
    ]
    assert len(verified) == 2, verified
    assert_bitwise_same_run(ref, fetch_run(s3, url, tmp_path / "fetched"))

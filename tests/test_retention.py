"""Retention pools under random saves, metrics, crashes mid-save, crashes mid-delete and restarts (hypothesis)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from resumable.checkpoint import commit_checkpoint, find_latest_checkpoint, list_checkpoints, step_name
from resumable.retention import CheckpointInfo, RetentionPolicy, pools, prune_checkpoints

save = st.tuples(st.just("save"), st.booleans(), st.one_of(st.none(), st.floats(0, 10, allow_nan=False)))
event = st.one_of(save, st.just(("crash_mid_save",)), st.just(("crash_mid_delete",)), st.just(("restart",)))
policies = st.builds(
    RetentionPolicy,
    keep_last=st.one_of(st.none(), st.integers(1, 3)),
    keep_epoch_every=st.integers(0, 2),
    keep_best=st.integers(0, 2),
    greater_is_better=st.booleans(),
)


def write_checkpoint(root: Path, step: int, epochs_done: int | None, metric: float | None, commit: bool) -> None:
    tmp = root / f".tmp-{step_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / "progress.json").write_text(json.dumps({"step": step}))
    (tmp / "model.safetensors").write_bytes(os.urandom(64))
    if commit:
        metrics = {"eval/loss": metric} if metric is not None else {}
        fields = {"epochs_done": epochs_done, "metrics": metrics, "metrics_step": step if metrics else None}
        commit_checkpoint(tmp, root / step_name(step), step, fields)


def present(root: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in list_checkpoints(root)}


def expected_survivors(history: list[CheckpointInfo], policy: RetentionPolicy) -> set[int]:
    """What every pool wants, judged over all checkpoints ever committed (pruned ones can never come back)."""
    return {int(name.split("-")[1]) for name, wanted in pools(history, policy).items() if wanted}


@settings(max_examples=80, deadline=None)
@given(policy=policies, events=st.lists(event, min_size=1, max_size=25))
def test_pools_keep_what_they_want_and_never_lose_the_newest_or_best(policy, events):
    policy = RetentionPolicy(**{**policy.__dict__, "metric": "eval/loss"})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "checkpoints"
        root.mkdir()
        history: list[CheckpointInfo] = []
        epochs = 0
        for step, ev in enumerate(events, start=1):
            if ev[0] == "save":
                _, epoch_end, metric = ev
                epochs += int(epoch_end)
                write_checkpoint(root, step, epochs if epoch_end else None, metric, commit=True)
                history.append(CheckpointInfo(step_name(step), step, epochs if epoch_end else None, metric))
                prune_checkpoints(root, policy)
                # right after a prune exactly the wanted checkpoints remain
                assert present(root) == expected_survivors(history, policy)
            elif ev[0] == "crash_mid_save":
                write_checkpoint(root, step, None, None, commit=False)  # a .tmp folder and no manifest
            elif ev[0] == "crash_mid_delete":
                doomed = sorted(present(root) - expected_survivors(history, policy))
                if doomed:  # the rename that starts a delete happened, the rmtree did not
                    os.replace(root / step_name(doomed[0]), root / f".trash-{step_name(doomed[0])}")
            # after any event, a restart resumes from the newest committed checkpoint
            newest = find_latest_checkpoint(root)
            assert (newest.name if newest else None) == (history[-1].name if history else None)
            kept = present(root)
            assert expected_survivors(history, policy) <= kept
            # each pool, checked independently of `pools()`
            last_n = history if policy.keep_last is None else history[-policy.keep_last :]
            assert {c.step for c in last_n} <= kept
            if policy.keep_epoch_every:
                assert {
                    c.step for c in history if c.epochs_done and c.epochs_done % policy.keep_epoch_every == 0
                } <= kept
            if history and policy.keep_best:
                scored = [c for c in history if c.metric is not None]
                if scored:
                    best = (max if policy.greater_is_better else min)(c.metric for c in scored)
                    assert any(c.step in kept for c in scored if c.metric == best)


def test_a_nan_metric_is_never_best_and_never_pushes_the_real_best_out():
    history = [CheckpointInfo(step_name(s), s, None, m) for s, m in [(4, 3.0), (8, float("nan")), (12, 2.5), (16, 2.9)]]
    wanted = pools(history, RetentionPolicy(keep_last=1, keep_best=1))
    assert "best" in wanted[step_name(12)] and not wanted[step_name(8)] and not wanted[step_name(4)]

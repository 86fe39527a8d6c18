"""Retention of a remote `--output_dir`'s checkpoints: the local store's pools, applied to object storage."""

from __future__ import annotations

from resumable.checkpoint import MANIFEST
from resumable.retention import CheckpointInfo, RetentionPolicy, pools


class RemoteRetention:
    """What `RemoteMirror` keeps and deletes remotely; it brings `remote_checkpoints`, `_check_remote` and `_rm`."""

    def delete_remote(self, names: list[str]) -> None:
        """Delete remote checkpoints: manifest first, so a delete cut short leaves no folder that looks complete."""
        for name in names:
            self._rm("checkpoints", name, MANIFEST)
            self._rm("checkpoints", name, recursive=True)

    def _remote_infos(self, metric: str) -> list[CheckpointInfo]:
        """The remote checkpoints that look complete (manifest checksum, every file at its size; nothing hashed)."""
        infos = []
        for name in self.remote_checkpoints():
            _, m, reason = self._check_remote(name)
            if reason is None:
                value = m.get("metrics", {}).get(metric) if m.get("metrics_step") == m["step"] else None
                infos.append(CheckpointInfo(name, m["step"], m.get("epochs_done"), value))
        return infos

    def best_remote(self, policy: RetentionPolicy) -> str | None:
        """Name of the remote checkpoint with the best metric measured at its own step (for `best` resumes)."""
        infos = self._remote_infos(policy.metric)
        best_only = RetentionPolicy(keep_best=1, metric=policy.metric, greater_is_better=policy.greater_is_better)
        return next((n for n, wanted_by in pools(infos, best_only).items() if "best" in wanted_by), None)

    def prune_remote(self, policy: RetentionPolicy) -> list[str]:
        """Apply `policy` to the remote checkpoints themselves (the staging folder may hold only the newest).

        Invalid remote checkpoints are left alone, as locally. Returns the names deleted.
        """
        infos = self._remote_infos(policy.metric)
        doomed = [name for name, wanted_by in pools(infos, policy).items() if not wanted_by]
        self.delete_remote(doomed)
        return doomed

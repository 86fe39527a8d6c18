"""Where in the training data a run stands, and how it gets back there: what the loop asks of its data.

Two feeds with one interface: `IndexedFeed` (a tokenized dataset shuffled by accelerate's seedable sampler: a
position is a batch index, skipped at index level) and `StreamFeed` (--streaming, stream.py: a position is every
worker's cursor plus the blocks not trained on yet, saved per process as `stream_state_{rank}.json`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from resumable.config import TrainConfig
from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.stream import HubShards, PackedStream

log = get_logger(__name__)
STREAM_STATE = "stream_state_{rank}.json"


def data_fingerprint(train: datasets.Dataset, rows: int = 256) -> dict:
    """What a saved position is a position in: the example count and a hash of evenly spaced tokenized examples.

    Content-based (not file times), so copying the data to another node keeps it, and cheap at any size.
    """
    n = len(train)
    picks = sorted({round(i * (n - 1) / max(rows - 1, 1)) for i in range(min(rows, n))})
    digest = hashlib.sha256()
    columns = [c for c in ("input_ids", "labels") if c in train.column_names]
    for row in train.select(picks).with_format(None).select_columns(columns):
        digest.update(repr([row[c] for c in columns]).encode())
    return {"examples": n, "sample_sha256": digest.hexdigest()[:16]}


def check_same_data(cfg: TrainConfig, checkpoint: Path, saved: dict | None, now: dict) -> None:
    """Refuse to resume a position in data that changed since (a file edited in place, an unpinned hub dataset)."""
    if saved is None or saved == now:  # None: a checkpoint from before fingerprints were recorded
        return
    source = (
        cfg.train_file and f"--train_file {cfg.train_file}" or cfg.dataset_name and f"--dataset_name {cfg.dataset_name}"
    )
    count = next((k for k in ("examples", "shards", "bytes") if saved.get(k) != now.get(k)), None)
    what = f"{saved.get(count)} {count} then, {now.get(count)} now" if count else "same size, different content"
    raise UserError(
        f"{source or 'the embedded corpus'}: the training data changed since {checkpoint} ({what}), so its saved "
        "position would skip or repeat examples; restore the data, or pass --resume_from_checkpoint none to start "
        "over (the old run is moved aside, not deleted)"
    )


def batches_to_skip(saved_layout: tuple[int, int, int], layout: tuple[int, int, int], samples_in_epoch: int,
                    batches_in_epoch: int) -> tuple[int, str]:  # fmt: skip
    """Micro-batches each process skips to resume the epoch, for a (world size, batch, accumulation) layout.

    The shuffle order is the same permutation whatever the layout; the position is kept in samples, so a
    different number of processes or per-device batch resumes at the same sample. Returns (skip, note).
    """
    if saved_layout[:2] == layout[:2]:
        return batches_in_epoch, ""
    world, batch, accumulation = layout
    skip, extra = divmod(samples_in_epoch, world * batch)
    note = (
        f"elastic resume: saved as {saved_layout[0]} process(es) x batch {saved_layout[1]} x accumulation "
        f"{saved_layout[2]}, now {world} x {batch} x {accumulation}; {samples_in_epoch} samples into the epoch "
        f"= {skip} batches per process"
    )
    if extra:
        note += f" ({extra} samples of the next batch will be seen again)"
    return skip, note


class IndexedFeed:
    """A map-style dataset: epoch e's order is a pure function of (seed, e); a position is a batch index."""

    def __init__(self, accelerator, cfg: TrainConfig, train_dl, train_ds: datasets.Dataset):
        self.accelerator, self.loader, self.ga = accelerator, train_dl, cfg.gradient_accumulation_steps
        self.bs = cfg.per_device_train_batch_size
        self.batches_per_epoch = len(train_dl)  # per process, after sharding
        self.fingerprint = data_fingerprint(train_ds)

    def describe(self) -> str:
        return f"{self.batches_per_epoch} micro-batches of {self.bs} per process per epoch"

    def epoch(self, progress) -> tuple:
        """The batches left in `progress.epoch`, and how many each process has had already."""
        self.loader.set_epoch(progress.epoch)  # must precede skip_first_batches: its new loader shares the sampler
        micro = progress.batches_in_epoch
        return (self.accelerator.skip_first_batches(self.loader, micro) if micro else self.loader), micro

    def window(self, window_start: int) -> int:
        return min(self.ga, self.batches_per_epoch - window_start)  # the epoch's last window may be short

    def epoch_done(self, micro: int) -> bool:
        return micro == self.batches_per_epoch

    def epochs(self, progress) -> float:
        return progress.epoch + progress.batches_in_epoch / self.batches_per_epoch

    def resume(self, resume_dir: Path, progress, saved: tuple[int, int, int], layout: tuple[int, int, int]) -> str:
        """Set `progress` to the batch this layout resumes at; returns how far into the epoch that is."""
        skip, note = batches_to_skip(saved, layout, progress.samples_in_epoch, progress.batches_in_epoch)
        if note:
            log.info(note)
        if skip >= self.batches_per_epoch:  # never spin on an epoch that has nothing left
            raise UserError(f"{resume_dir}: its position ({skip} batches into the epoch) is past the epoch's end")
        progress.batches_in_epoch = skip
        return f"batch {skip}/{self.batches_per_epoch} of the epoch"

    def checkpoint_files(self) -> dict:
        return {}  # the sampler's state is in accelerate's own files


class StreamFeed:
    """--streaming: windows from the workers cut into batches; every process ends an epoch at the same step."""

    batches_per_epoch = None  # unknown until read

    def __init__(self, accelerator, cfg: TrainConfig, stream: PackedStream, team):
        self.accelerator, self.stream, self.team = accelerator, stream, team
        self.bs, self.ga, self.workers = (
            cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
            cfg.dataloader_num_workers,
        )
        self.batch_size = self.bs  # what DeepSpeed's "auto" micro-batch size reads in accelerator.prepare
        self.fingerprint = stream.shards.fingerprint()
        self.state = self._fresh(0)

    def _fresh(self, epoch: int) -> dict:
        return {"epoch": epoch, "cursors": [None] * self.stream.roles, "next_role": 0, "batches": 0,
                "blocks": torch.zeros(0, self.stream.block, dtype=torch.long)}  # fmt: skip

    def describe(self) -> str:
        s = self.stream
        return (f"a stream of {s.block}-token blocks from {len(s.shards)} shard(s), {s.roles} stream(s) per "
                f"process, shuffled in windows of {s.window} blocks, micro-batches of {self.bs}")  # fmt: skip

    def epoch(self, progress) -> tuple:
        if self.state["epoch"] != progress.epoch:
            self.state = self._fresh(progress.epoch)
        return self._batches(), progress.batches_in_epoch

    def _batches(self):
        st, s, bs, need = self.state, self.stream, self.bs, self.bs * self.ga
        s.epoch, s.cursors, s.first_role = st["epoch"], list(st["cursors"]), st["next_role"]
        # its own generator: a loader without one draws its workers' seed from the global RNG (dropout's)
        loader = DataLoader(s, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                            generator=torch.Generator().manual_seed(s.seed))  # fmt: skip
        items = iter(loader)
        pending = [st["blocks"]]
        have = len(st["blocks"])

        def fill(n: int) -> bool:
            """Pull windows until this process holds `n` blocks; whether every process does. A bad row on one
            process stops every process with its one line (none waits in the gather for a process that left)."""
            nonlocal have
            error = None
            while have < n and error is None and (item := next(items, None)) is not None:
                if "error" in item:
                    error = f"rank {self.accelerator.process_index}: {item['error']}"
                    break
                pending.append(item["blocks"])
                have += len(item["blocks"])
                st["cursors"][item["role"]], st["next_role"] = item["cursor"], (item["role"] + 1) % s.roles
            views = self.team.all_gather((have >= n, error))
            if errors := [e for _, e in views if e]:
                raise UserError(errors[0])
            return all(ok for ok, _ in views)

        if st["batches"] == 0 and not fill(need):
            raise UserError(f"epoch {st['epoch']} of the training stream yields fewer than {need} blocks of "
                            f"{s.block} tokens on some process, less than one optimizer step (add data, or lower "
                            "--block_size, the batch size or the number of processes)")  # fmt: skip
        k = 0
        while True:
            ends = k % self.ga == self.ga - 1 and not fill(bs + need)  # another whole window after this one?
            blocks = torch.cat(pending)
            batch, rest = blocks[:bs], blocks[bs:]
            pending[:], have = [rest], len(rest)
            st["blocks"], st["batches"], k = rest, st["batches"] + 1, k + 1
            if ends:  # the leftover, less than a window on some process, is not trained on
                self.state = self._fresh(st["epoch"] + 1)
            batch = batch.to(self.accelerator.device)
            yield {"input_ids": batch, "labels": batch}
            if ends:
                return

    def window(self, window_start: int) -> int:
        return self.ga

    def epoch_done(self, micro: int) -> bool:
        return self.state["batches"] == 0  # _batches began the next epoch's state

    def epochs(self, progress) -> float:
        return float(progress.epoch)

    def checkpoint_files(self) -> dict:
        st = self.state
        return {STREAM_STATE.format(rank=self.accelerator.process_index): {
            **{k: v for k, v in st.items() if k != "blocks"}, "blocks": st["blocks"].tolist(),
            "world": self.accelerator.num_processes, "roles": self.stream.roles, "block_size": self.stream.block}}  # fmt: skip

    def resume(self, resume_dir: Path, progress, saved: tuple[int, int, int], layout: tuple[int, int, int]) -> str:
        rank, world, roles = self.accelerator.process_index, self.accelerator.num_processes, self.stream.roles
        path = resume_dir / STREAM_STATE.format(rank=rank)
        try:
            st = json.loads(path.read_text())
            st = st if isinstance(st, dict) and {"world", "roles", "blocks", "cursors"} <= st.keys() else "bad"
        except FileNotFoundError:
            st = None
        except ValueError:
            st = "bad"
        if st == "bad":
            raise UserError(f"{path}: not a stream position this version can read")
        if st is None or (st["world"], st["roles"], saved[1:]) != (world, roles, layout[1:]):
            was = f"{st['world']} process(es) x {max(st['roles'], 1)} stream(s)" if st else "no stream position"
            raise UserError(
                f"{resume_dir}: a streamed position is per process and DataLoader worker, and cannot be re-dealt "
                f"(saved: {was}, batch {saved[1]} x accumulation {saved[2]}; now {world} x {roles}, batch "
                f"{layout[1]} x accumulation {layout[2]}); resume with the saved --num_processes, "
                "--dataloader_num_workers and batch settings, or start over with --resume_from_checkpoint none"
            )
        blocks = torch.tensor(st["blocks"], dtype=torch.long).view(-1, st["block_size"])
        self.state = {**{k: st[k] for k in ("epoch", "cursors", "next_role", "batches")}, "blocks": blocks}
        rows = max((c or {}).get("rows", 0) for c in st["cursors"])
        hub = isinstance(self.stream.shards, HubShards)  # datasets cannot seek into a shard: it skips rows
        again = "rows of the current shard skipped again" if hub else "none read again"
        return f"batch {st['batches']} of the streamed epoch ({rows} rows into it, {again})"


def _as_is(item):
    return item


def feed_for(accelerator, cfg: TrainConfig, train_dl, train_ds, team) -> IndexedFeed | StreamFeed:
    """The loop's data: `train_dl` prepared by accelerate, or (--streaming) the stream, read by the feed itself."""
    if isinstance(train_ds, PackedStream):
        return StreamFeed(accelerator, cfg, train_ds, team)
    return IndexedFeed(accelerator, cfg, train_dl, train_ds)

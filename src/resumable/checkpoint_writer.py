"""How a checkpoint gets from the training state to the store: in the loop (default), or with `--async_save` in
the background, training waiting only for a copy of the state in CPU memory.

Either way the commit protocol is checkpoint.py's (every file in `.tmp-step-N/`, manifest last, atomic rename),
then the retention policy and, for s3:// output dirs, the upload. Asynchronously: at the step boundary each
process writes its small state (RNG states, samplers, scaler: accelerate's own format and files) and its own
files (a stream position), and rank 0 copies the weights, the optimizer and scheduler states and the weight average
(EMA/SWA) into reused CPU buffers; a thread then writes them, waits until every rank's files are in the folder, commits, prunes
and uploads. The next save, a stop and the end of training wait for it (`wait()`), and an error in it (a full
disk) surfaces there. A kill mid-write leaves only the `.tmp-` folder: the previous checkpoint stays the newest.
"""

from __future__ import annotations

import copy
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.preemption import inject_delay

log = get_logger(__name__)
WRITTEN = ".written-{rank}"  # a rank's files are all in the temporary folder (async saves, several processes)


class CheckpointWriter:
    """--async_save off: a save commits, prunes and uploads before training goes on."""

    def __init__(self, accelerator, cfg, policy, mirror):
        self.accelerator, self.cfg, self.policy, self.mirror = accelerator, cfg, policy, mirror
        self.background_s = 0.0  # the last background write's duration (the stop budget keeps room for one)

    def save(self, progress, recorded: dict, files: dict) -> None:
        from resumable.checkpoint import save_checkpoint

        t0 = time.perf_counter()
        folder = save_checkpoint(self.accelerator, self.cfg.checkpoints_dir, progress, recorded, files)
        if self.accelerator.is_main_process:
            self.after_commit(folder)
        log.debug(f"checkpoint {folder.name}: training blocked {time.perf_counter() - t0:.3f} s")  # benchmarks read it

    def after_commit(self, folder: Path) -> None:
        """Rank 0: retention, then the upload (data files first, manifest last: a cut upload is never taken)."""
        from resumable.retention import prune_checkpoints

        prune_checkpoints(self.cfg.checkpoints_dir, self.policy)
        if self.mirror:
            self.mirror.push_checkpoint(folder)
            for name in ("train_log.jsonl", "train.log"):
                self.mirror.push_file(name)
            self.mirror.prune_remote(self.policy)

    def wait(self) -> None:
        """Until the pending save (if any) is committed."""


class AsyncCheckpointWriter(CheckpointWriter):
    def __init__(self, accelerator, cfg, policy, mirror):
        super().__init__(accelerator, cfg, policy, mirror)
        self.thread: threading.Thread | None = None
        self.waited_s = 0.0  # joining the previous write since the last save: part of what the next save blocks
        self.error: tuple | None = None  # (exception, temporary folder, checkpoint) of a failed background write
        self.buffers: dict = {}  # reused from save to save: no allocation (page faults) at the step boundary

    def save(self, progress, recorded: dict, files: dict) -> None:
        from accelerate.checkpointing import save_accelerator_state

        from resumable.checkpoint import TensorFile, _write_json, step_name
        from resumable.ranks import prepare_separate, ranks

        self.wait()
        t0, acc, team = time.perf_counter() - self.waited_s, self.accelerator, ranks(self.accelerator)
        self.waited_s = 0.0
        final = self.cfg.checkpoints_dir / step_name(progress.step)
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
            tmp.mkdir(parents=True)
        team.wait()
        prepare_separate(team, tmp)
        if not all(team.all_gather((tmp / ".owner").is_file() or team.world == 1)):
            raise UserError("--async_save needs one checkpoints folder that every process sees (node-local "
                            "staging folders are gathered by collectives): save without --async_save")  # fmt: skip
        # the small state now, in accelerate's own files: RNG states, samplers, scaler
        save_accelerator_state(str(tmp), [], [], [], acc._dataloaders, acc.state.process_index, acc.step,
                               acc.scaler, save_on_each_node=acc.project_configuration.save_on_each_node)  # fmt: skip
        later = {name: content for name, content in files.items() if isinstance(content, TensorFile)}
        for name, content in files.items():
            if name not in later:
                _write_json(tmp / name, content) if isinstance(content, dict) else content(tmp / name)
        if not acc.is_main_process:
            for name, content in later.items():  # only rank 0 has tensor files (the weight average)
                content(tmp / name)
            (tmp / WRITTEN.format(rank=acc.process_index)).touch()
            return
        state = self._snapshot(later)
        progress, fields = copy.deepcopy(progress), self._fields(progress, recorded)
        self.thread = threading.Thread(target=self._write, args=(tmp, final, progress, fields, state),
                                       name="async-checkpoint", daemon=False)  # fmt: skip
        self.thread.start()
        log.debug(f"checkpoint {final.name}: training blocked {time.perf_counter() - t0:.3f} s (the rest in the "
                  "background)")  # fmt: skip

    def _copy(self, key, tensor: torch.Tensor, seen: dict) -> torch.Tensor:
        """`tensor` copied into its reused CPU buffer (a tensor shared under two names is copied once)."""
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if ident in seen:
            return seen[ident]
        buf = self.buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buf = self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        buf.copy_(tensor.detach(), non_blocking=True)
        seen[ident] = buf
        return buf

    def _snapshot(self, files: dict) -> tuple:
        """CPU copies of the weights, optimizer and scheduler states and the tensor files, as of this step."""
        from resumable.checkpoint import TensorFile

        acc, seen = self.accelerator, {}
        weights = OrderedDict(
            (k, self._copy(("w", k), v, seen) if torch.is_tensor(v) else v)
            for k, v in acc.get_state_dict(acc._models[0], unwrap=False).items()
        )
        optimizers = []
        for i, opt in enumerate(acc._optimizers):
            sd = opt.state_dict()
            state = {p: {k: self._copy(("o", i, p, k), v, seen) if torch.is_tensor(v) else v for k, v in s.items()}
                     for p, s in sd["state"].items()}  # fmt: skip
            optimizers.append(_Frozen({"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}))
        schedulers = [_Frozen(copy.deepcopy(s.state_dict())) for s in acc._schedulers]
        files = {name: TensorFile({k: self._copy(("f", name, k), v, seen) for k, v in f.tensors.items()},
                                  dict(f.metadata)) for name, f in files.items()}  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies are complete
        return weights, optimizers, schedulers, files

    def _fields(self, progress, recorded: dict) -> dict:
        from resumable.checkpoint import _manifest_fields

        return _manifest_fields(self.accelerator, progress, recorded)

    def _write(self, tmp: Path, final: Path, progress, fields: dict, state: tuple) -> None:
        from dataclasses import asdict

        from accelerate.checkpointing import save_accelerator_state

        from resumable.checkpoint import PROGRESS, _write_json, commit_checkpoint
        from resumable.ranks import drop_owner

        t0, acc = time.perf_counter(), self.accelerator
        try:
            scratch = tmp / ".async"  # its RNG file would hold the state of now, not of the step: dropped
            weights, optimizers, schedulers, files = state
            inject_delay("async_write")
            scratch.mkdir()
            save_accelerator_state(str(scratch), [weights], optimizers, schedulers, [], acc.state.process_index,
                                   acc.step, None)  # fmt: skip
            for path in scratch.iterdir():
                if not path.name.startswith("random_states"):
                    path.rename(tmp / path.name)
            shutil.rmtree(scratch)
            for name, content in files.items():  # the weight average
                content(tmp / name)
            others = [tmp / WRITTEN.format(rank=r) for r in range(1, acc.num_processes)]
            deadline = time.monotonic() + self.cfg.ddp_timeout
            while not all(p.exists() for p in others):  # the other ranks write only small files
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tmp.name}: other ranks' files missing after {self.cfg.ddp_timeout} s")
                time.sleep(0.01)
            for p in others:
                p.unlink()
            drop_owner(tmp)
            _write_json(tmp / PROGRESS, asdict(progress))
            commit_checkpoint(tmp, final, progress.step, fields)
            self.after_commit(final)
            log.debug(f"saved checkpoint {final.name} in the background in {time.perf_counter() - t0:.3f} s")
        except BaseException as err:  # raised in the training thread by wait()
            self.error = (err, tmp, final)
        finally:
            self.background_s = time.perf_counter() - t0

    def wait(self) -> None:
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.join()
            self.thread = None
            self.waited_s += time.perf_counter() - t0
        if self.error is not None:
            (err, tmp, final), self.error = self.error, None
            from resumable.checkpoint import _disk_full
            from resumable.disk import is_disk_full

            if is_disk_full(err):
                raise _disk_full(self.cfg.checkpoints_dir, tmp, final) from None
            raise err


class _Frozen:
    """An optimizer or scheduler as accelerate's writer sees it: its state_dict() as of the snapshot."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def checkpoint_writer(accelerator, cfg, policy, mirror) -> CheckpointWriter:
    """The writer --async_save asks for; refused in one line where the backend writes its own shards."""
    from resumable.backend import layout

    if not cfg.async_save:
        return CheckpointWriter(accelerator, cfg, policy, mirror)
    if layout(accelerator) != "ddp":
        raise UserError(f"--async_save: under {layout(accelerator)} the engine writes its own shards in its "
                        "save; train without --async_save")  # fmt: skip
    if accelerator.distributed_type.name == "XLA":
        raise UserError("--async_save is not supported on TPU (XLA tensors are copied by the XLA runtime)")
    return AsyncCheckpointWriter(accelerator, cfg, policy, mirror)

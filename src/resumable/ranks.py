"""The ranks of one job: one resume decision for all, every rank's state in each commit, patient waits.

Multi-node runs break what one machine hides: NFS attribute caches and node-local staging folders (an s3://
output dir with `RESUMABLE_CACHE` per node) give each node its own view of the checkpoints, and NCCL's watchdog
kills a job whose ranks wait more than `--ddp_timeout` in a collective while rank 0 alone tokenizes a corpus or
uploads a checkpoint. So:
- rank 0 plans the resume and verifies that checkpoint (sha256) once; the others follow its plan, and each other
  copy of the checkpoint (a node-local staging folder) is verified once, by the first rank that uses it; a rank
  that cannot use it stops every rank with one line;
- a commit holds every rank's files: files that rank 0 cannot see (another node's staging folder) are sent to it
  (small RNG files), or the commit is refused (per-rank shards that belong on a shared folder);
- waits for work one rank does alone go through a gloo side group with a timeout of PATIENT_WAIT, not the
  training collectives' `--ddp_timeout`: if that rank dies instead, gloo notices the closed connection at once.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
import socket
from datetime import timedelta
from pathlib import Path

from resumable.errors import UserError
from resumable.logs import get_logger

log = get_logger(__name__)
PATIENT_WAIT = timedelta(hours=24)  # building caches of a large corpus, uploading a large checkpoint
MAX_SENT_BYTES = 256 * 2**20  # files rank 0 cannot see that are sent to it at a commit; beyond: refused


class Ranks:
    """This process's view of the job: rank, world, and collectives that wait as long as PATIENT_WAIT."""

    def __init__(self, accelerator) -> None:
        import torch.distributed as dist

        self.accelerator, self.dist = accelerator, dist
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main, self.is_local_main = accelerator.is_main_process, accelerator.is_local_main_process
        self.group = None
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=PATIENT_WAIT)  # every rank, once (see ranks())

    def wait(self) -> None:
        """Every rank waits for all; for work one rank does alone, which may take longer than --ddp_timeout."""
        if self.world == 1:
            return
        if self.group is None:  # no torch.distributed (XLA): accelerate's own barrier
            self.accelerator.wait_for_everyone()
        else:
            self.dist.barrier(group=self.group)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        if self.group is None:
            from accelerate.utils import broadcast_object_list

            return broadcast_object_list(box)[0]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        if self.group is None:  # XLA: accelerate's own object gather
            from accelerate.utils import gather_object

            return gather_object([obj])
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    @contextlib.contextmanager
    def in_turn(self):
        """Rank 0 first, then the first process of every other node, then the rest: a cache one of them builds
        is reused by the next, and no two processes of one node build the same cache at once. An error in one
        rank's turn (a bad data file) is raised on every rank, as one line, at the end of that turn."""
        if self.world == 1:
            yield
            return
        turn = 0 if self.is_main else 1 if self.is_local_main else 2
        for phase in range(3):
            failure = None
            if phase == turn:
                try:
                    yield
                except Exception as err:  # raised again below, on this rank as it is, on the others as one line
                    failure = err
            self.raise_any(failure, "preparing the data")

    def raise_any(self, failure: Exception | None, doing: str) -> None:
        """Collective: if any rank failed (`failure`), raise on every rank: the failing rank its own exception, the
        others a UserError with its one line."""
        if self.world == 1 or self.group is None:  # XLA: no side group; a failing rank stops the job as it is
            if self.world > 1:
                self.wait()
            if failure is not None:
                raise failure
            return
        code = getattr(failure, "exit_code", 1)
        reports = self.all_gather(None if failure is None else (code, str(failure).splitlines()[0][:500]))
        if failure is not None:
            raise failure
        bad = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if bad:
            rank, (code, line) = bad[0]
            error = UserError(f"rank {rank} failed {doing}: {line}")
            error.exit_code = code
            raise error


@functools.lru_cache(maxsize=1)
def ranks(accelerator) -> Ranks:
    """The job's Ranks (its side group is made once, by every rank at the same call: the first)."""
    return Ranks(accelerator)


# --- every rank's files in the commit


def _listing(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != OWNER)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}


OWNER = ".owner"  # in rank 0's temporary folder of a save: which ranks see that very folder


def prepare_separate(team: Ranks, tmp: Path) -> None:
    """Before `save_state`, after rank 0 made `tmp` afresh: a rank that sees another folder under that name (another
    node's staging folder) has it emptied by its node's first rank, so that no file of an earlier, killed save
    there can be taken into this checkpoint."""
    if team.world == 1 or team.group is None:
        return
    nonce = team.broadcast(secrets.token_hex(8) if team.is_main else None)
    if team.is_main:
        (tmp / OWNER).write_text(nonce)
    team.wait()
    try:
        sees = (tmp / OWNER).read_text() == nonce
    except OSError:
        sees = False
    views = team.all_gather((host(), str(tmp.absolute()), sees))
    if not sees and views.index(views[team.rank]) == team.rank:  # the first rank of this view
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    team.wait()


def collect_rank_files(team: Ranks, tmp: Path) -> bool:
    """After every rank saved into `tmp` (before the commit): make every rank's files present in rank 0's `tmp`.

    Returns whether this rank's `tmp` is a folder rank 0 does not see (another node's staging folder), which this
    rank removes once the checkpoint is committed. Raises UserError on every rank when the files rank 0 lacks are
    too large to send (per-rank shards: they belong on a folder every node shares).
    """
    if team.world == 1 or team.group is None:  # XLA: no torch.distributed; TPU hosts share the staging folder
        return False
    listings = team.all_gather(_listing(tmp))
    main = listings[0]
    owner: dict[str, int] = {}
    for rank, listing in enumerate(listings[1:], start=1):
        for name in listing:
            if name not in main:
                owner.setdefault(name, rank)
    separate = bool(set(listings[team.rank]) - set(main)) and team.rank != 0
    if not owner:
        return separate
    total = sum(listings[rank][name] for name, rank in owner.items())
    ranks_missing = sorted(set(owner.values()))
    if total > MAX_SENT_BYTES:
        raise UserError(
            f"{tmp.name}: rank(s) {', '.join(map(str, ranks_missing))} saved {total / 2**20:.0f} MiB into a folder "
            f"rank 0 cannot see (node-local staging, e.g. RESUMABLE_CACHE per node); per-rank shards need a staging "
            f"folder every node shares: set --cache_dir (or RESUMABLE_CACHE) to a shared filesystem"
        )
    parts = team.gather({name: (tmp / name).read_bytes() for name, rank in owner.items() if rank == team.rank})
    for part in parts or ():  # rank 0
        for name, data in part.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    log.debug(f"{tmp.name}: received {len(owner)} file(s) from rank(s) {ranks_missing} ({total} bytes)")
    return separate


def drop_owner(tmp: Path) -> None:
    """Rank 0, before the commit: the marker is not part of the checkpoint."""
    (tmp / OWNER).unlink(missing_ok=True)


def discard_separate(tmp: Path, separate: bool) -> None:
    """After the commit: a node-local copy of the temporary folder (its files were sent to rank 0) goes."""
    if separate:
        shutil.rmtree(tmp, ignore_errors=True)


def host() -> str:
    return socket.gethostname()

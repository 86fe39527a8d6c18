"""Streamed training data (--streaming): documents read shard by shard, tokenized, packed into --block_size blocks
and shuffled on the fly, with a position that resumes exactly without reading anything before it again.

Order. Epoch e reads the shards in a permutation drawn from (seed, e). Rows are dealt round-robin to the job's
streams, one per (process, DataLoader worker): a stream tokenizes only its own rows, packs their tokens (EOS after
each document) into blocks and shuffles them in windows of --shuffle_buffer blocks, window w permuted by
(seed, e, stream, w). No block is trained on twice in an epoch; an epoch ends for every process at the first
accumulation window some process cannot fill, and what is left (less than a window on some process) is dropped.
Nothing depends on timing.

Position. A worker hands each window to its training process together with its cursor after it (shard, byte
offset in it, rows dealt, the tokens not yet in a block). The process keeps every worker's last cursor and the
blocks it has not trained on yet; that is the checkpoint (`stream_state_{rank}.json`, feed.py). A resume seeks
each shard file to its byte (a hub shard skips rows within the shard: `datasets` cannot seek) and trains first
on the saved blocks.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from resumable.errors import UserError

STREAM_SUFFIXES = (".txt", ".jsonl", ".json")  # .json: JSON lines; a JSON array cannot be read from an offset
# rows of one stream tokenized in one call (the fast tokenizer's per-call overhead), up to 64K characters: the
# tokens not yet in a block travel in every window's cursor and in the checkpoint
TOKENIZE_ROWS, TOKENIZE_CHARS = 64, 65536


def stream_files(pattern: str, flag: str = "--train_file") -> list[str]:
    """The shard files a --train_file path or glob names, sorted; a UserError naming the flag if unusable."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not paths or not all(Path(p).is_file() for p in paths):
        raise UserError(f"{flag} {pattern}: no such file" + (" matches" if glob.has_magic(pattern) else ""))
    suffixes = {Path(p).suffix for p in paths}
    if len(suffixes) > 1 or not suffixes <= set(STREAM_SUFFIXES):
        raise UserError(f"{flag} {pattern}: --streaming reads {', '.join(STREAM_SUFFIXES)} files of one format "
                        f"(found {', '.join(sorted(suffixes))})")  # fmt: skip
    return paths


class FileShards:
    """Local shard files: .txt (one row per line) or JSON lines; a row's position is its byte offset."""

    def __init__(self, paths: list[str], text_column: str):
        self.paths, self.text_column, self.text = paths, text_column, paths[0].endswith(".txt")

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, shard: int, offset: int) -> Iterator[tuple[bytes, int]]:
        """(raw row, offset after it) of every row of `shard` from byte `offset` on."""
        with open(self.paths[shard], "rb") as fh:
            fh.seek(offset)
            for line in iter(fh.readline, b""):
                yield line, fh.tell()

    def text_of(self, row: bytes, shard: int, end: int) -> str | None:
        line = row.decode("utf-8", errors="replace").rstrip("\r\n")
        if self.text:
            return line  # a blank line is content (a paragraph break), as in the non-streamed .txt path
        if not line.strip():
            return None
        try:
            value = json.loads(line)
        except ValueError as err:
            raise UserError(f"{self.paths[shard]} (byte {end - len(row)}): not a JSON line ({err})") from None
        value = value.get(self.text_column) if isinstance(value, dict) else None
        return value if isinstance(value, str) else None

    def fingerprint(self) -> dict:
        """Content-based: the size and the first and last 64 KiB of every shard (cheap at any size)."""
        digest, total = hashlib.sha256(), 0
        for path in self.paths:
            size = Path(path).stat().st_size
            total += size
            with open(path, "rb") as fh:
                digest.update(f"{Path(path).name}:{size}:".encode() + fh.read(65536))
                fh.seek(max(0, size - 65536))
                digest.update(fh.read())
        return {"shards": len(self.paths), "bytes": total, "sample_sha256": digest.hexdigest()[:16]}


class HubShards:
    """A hub dataset streamed by `datasets` (also a local dataset folder or script): its data files are the shards,
    a row's position is its index in the shard (resuming skips rows of the current shard only)."""

    def __init__(self, name: str, config: str | None, text_column: str, cache_dir: str):
        self.name, self.config, self.text_column, self.cache_dir = name, config, text_column, cache_dir
        self._ds = None

    def __getstate__(self) -> dict:  # workers open their own stream
        return {**self.__dict__, "_ds": None}

    def dataset(self):
        if self._ds is None:
            import datasets

            self._ds = datasets.load_dataset(
                self.name, self.config, split="train", streaming=True, cache_dir=self.cache_dir
            )
        return self._ds

    def __len__(self) -> int:
        return self.dataset().num_shards

    def rows(self, shard: int, offset: int) -> Iterator[tuple[dict, int]]:
        part = self.dataset().shard(num_shards=len(self), index=shard, contiguous=True)
        # .iter(): iterating `part` itself inside a DataLoader worker would split it again across the workers
        index = offset
        for batch in (part.skip(offset) if offset else part).iter(batch_size=256):
            for row in ({k: v[i] for k, v in batch.items()} for i in range(len(next(iter(batch.values()), [])))):
                index += 1
                yield row, index

    def text_of(self, row: dict, shard: int, end: int) -> str | None:
        value = row.get(self.text_column)
        return value if isinstance(value, str) else None

    def fingerprint(self) -> dict:
        first = next(iter(self.dataset()), {})
        digest = hashlib.sha256(repr(sorted(first.items())).encode()).hexdigest()[:16]
        return {"shards": len(self), "dataset": self.name, "config": self.config, "sample_sha256": digest}


def shard_order(seed: int, epoch: int, shards: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(shards).tolist()


def fresh_cursor() -> dict:
    return {"shard": 0, "offset": 0, "rows": 0, "carry": [], "window": 0, "done": False}


class PackedStream(IterableDataset):
    """One process's streams (one per DataLoader worker): windows of shuffled blocks, each with its cursor."""

    def __init__(self, shards, tokenizer, block_size: int, window: int, seed: int, rank: int, world: int,
                 roles: int):  # fmt: skip
        super().__init__()
        self.shards, self.tokenizer, self.block, self.window, self.seed = shards, tokenizer, block_size, window, seed
        self.rank, self.world, self.roles = rank, world, roles
        self.epoch, self.cursors, self.first_role = 0, [None] * roles, 0  # set by the feed before each epoch
        self.head = None  # the tokenized first rows: what the unigram baseline counts (data.py)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info else 0) + self.first_role) % self.roles  # a resumed loader starts at the next role
        try:
            yield from self._windows(role, dict(self.cursors[role] or fresh_cursor()))
        except (UserError, OSError) as err:  # raised in the training process as one line (feed.py)
            yield {"role": role, "error": str(err)}
        except Exception as err:  # a hub stream's reader (pyarrow, fsspec): still one line, with its type
            yield {"role": role, "error": f"reading the training stream failed: {type(err).__name__}: {err}"}

    def _windows(self, role: int, cur: dict) -> Iterator[dict]:
        if cur["done"]:
            return
        stream, streams = self.rank * self.roles + role, self.world * self.roles
        order = shard_order(self.seed, self.epoch, len(self.shards))
        carry, blocks, texts, chars = list(cur["carry"]), [], [], 0

        def window_of(full: list) -> dict:
            perm = np.random.default_rng([self.seed, self.epoch, stream, cur["window"]]).permutation(len(full))
            cur["window"] += 1
            data = torch.tensor(full, dtype=torch.long).view(len(full), self.block)[torch.from_numpy(perm)]
            return {"role": role, "blocks": data, "cursor": {**cur, "carry": list(carry)}}

        def drain():  # whole windows out of the tokens read so far
            nonlocal blocks, carry
            used = 0
            while len(carry) - used >= self.block:
                blocks.append(carry[used : used + self.block])
                used += self.block
                if len(blocks) == self.window:
                    full, blocks = blocks, []
                    carry = carry[used:]  # the cursor carries only what is left (one copy per window)
                    used = 0
                    yield window_of(full)
            carry = carry[used:]

        def tokenize():
            nonlocal chars
            chars, eos = 0, self.tokenizer.eos_token_id
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
                carry.extend(ids)
                carry.append(eos)
            texts.clear()

        yield from drain()  # a resumed cursor may carry more than a block
        for k in range(cur["shard"], len(order)):
            start = cur["offset"] if k == cur["shard"] else 0
            cur["shard"], cur["offset"] = k, start
            for row, end in self.shards.rows(order[k], start):
                cur["rows"] += 1
                mine = (cur["rows"] - 1) % streams == stream
                text = self.shards.text_of(row, order[k], end) if mine else None
                if text is not None:
                    texts.append(text)
                    chars += len(text)
                if len(texts) == TOKENIZE_ROWS or chars >= TOKENIZE_CHARS:
                    cur["offset"] = end
                    tokenize()
                    yield from drain()
            cur["shard"], cur["offset"] = k + 1, 0  # the shard is read to its end
            tokenize()
            yield from drain()
        cur["done"] = True  # the tokens left (less than a block) end the epoch unused
        yield window_of(blocks) if blocks else {"role": role, "blocks": torch.zeros(0, self.block, dtype=torch.long),
                                                  "cursor": {**cur, "carry": []}}  # fmt: skip


def check_stream_flags(cfg) -> None:
    """--streaming's own rules, at parse time."""
    if cfg.task != "causal_lm":
        raise UserError(f"--streaming packs text into blocks for --task causal_lm, not --task {cfg.task}")
    if cfg.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream's length is not known before it has been read)")
    if cfg.shuffle_buffer < 1:
        raise UserError(f"--shuffle_buffer must be >= 1, got {cfg.shuffle_buffer}")
    if cfg.max_train_samples:
        raise UserError("--max_train_samples does not apply to --streaming (bound the run with --max_steps)")
    if cfg.train_file:
        stream_files(cfg.train_file)
        if not cfg.validation_file:
            raise UserError("--streaming with --train_file needs a --validation_file (none is held out of a stream)")


HEAD_ROWS = 2000  # rows read up front: the tokenizer is trained on them, and the unigram baseline counts them


def stream_raw(cfg, cache: Path, hf_cache: str):
    """Validation (loaded whole) and the stream's first rows as `train`; the shards as `.shards`."""
    import datasets

    from resumable.corpus import build_lm_corpus
    from resumable.data import BUILDERS
    from resumable.data_checks import clean_split, diagnose_load_failure

    if cfg.dataset_name:
        shards = HubShards(cfg.dataset_name, cfg.dataset_config_name, cfg.text_column, hf_cache)
        source = f"--dataset_name {cfg.dataset_name}"
        try:
            stream = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split="validation",
                                           streaming=True, cache_dir=hf_cache)  # fmt: skip
        except ValueError as err:  # no such split
            raise UserError(f"{source}: no 'validation' split to evaluate on ({err})") from None
        val = datasets.Dataset.from_list(list(stream.take(cfg.max_eval_samples or HEAD_ROWS)))
        builder = None
    else:
        if cfg.train_file:
            paths, vfile, source = (
                stream_files(cfg.train_file),
                cfg.validation_file,
                f"--validation_file {cfg.validation_file}",
            )
        else:
            files = build_lm_corpus(cache, cfg.validation_split_percentage)
            paths, vfile, source = (
                [str(files["train"])],
                str(files["validation"]),
                f"embedded corpus {files['validation']}",
            )
        shards, builder = FileShards(paths, cfg.text_column), BUILDERS[Path(vfile).suffix]
        try:
            val = datasets.load_dataset(builder, data_files={"validation": vfile}, cache_dir=hf_cache)["validation"]
        except Exception as err:
            raise diagnose_load_failure(builder, {"validation": vfile}, {"validation": source}, err, hf_cache) from None
    val = clean_split(cfg, val, source, keep_blank=builder == "text")
    texts = []
    for shard in range(len(shards)):
        for row, end in shards.rows(shard, 0):
            if (text := shards.text_of(row, shard, end)) is not None:
                texts.append(text)
            if len(texts) == HEAD_ROWS:
                break
        if len(texts) == HEAD_ROWS:
            break
    if not texts:
        raise UserError(f"{cfg.train_file and f'--train_file {cfg.train_file}' or source}: no rows with text "
                        f"in column {cfg.text_column!r}")  # fmt: skip
    head = datasets.Dataset.from_dict({cfg.text_column: texts})
    fingerprint = shards.fingerprint()
    head._fingerprint = hashlib.sha256(repr(sorted(fingerprint.items())).encode()).hexdigest()[:16]  # cache keys
    raw = datasets.DatasetDict(train=head, validation=val)
    raw.shards = shards
    return raw


def packed_stream(cfg, shards, tokenizer, head) -> PackedStream:
    """This process's streams over `shards`."""
    from accelerate import PartialState

    state = PartialState()
    stream = PackedStream(shards, tokenizer, cfg.block_size, cfg.shuffle_buffer, cfg.seed, state.process_index,
                          state.num_processes, max(1, cfg.dataloader_num_workers))  # fmt: skip
    stream.head = head
    return stream

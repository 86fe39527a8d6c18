"""Data: raw datasets (hub, files or the embedded stdlib corpus), the tokenizer, tokenization and the loaders.

Resume exactness depends on two choices here: every DataLoader gets its own seeded `torch.Generator` (otherwise
each `iter(loader)` draws from the global RNG and shifts dropout after a resume), and the train loader is
shuffled by accelerate's seedable sampler, so the order of epoch e is a pure function of (seed, e).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from resumable.config import TrainConfig, cache_root
from resumable.corpus import build_cls_corpus, build_lm_corpus, build_s2s_corpus
from resumable.data_checks import clean_split, diagnose_load_failure
from resumable.errors import UserError
from resumable.logs import get_logger
from resumable.seq2seq import MODEL_COLUMNS, tokenize_pairs

log = get_logger(__name__)
datasets.disable_progress_bars()
BUILDERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}
EOS, PAD, CLS = "<|endoftext|>", "<pad>", "<cls>"


# --- raw text


def load_raw_datasets(cfg: TrainConfig) -> datasets.DatasetDict:
    """train and validation splits with `cfg.text_column` (and `cfg.label_column` for classification).

    Rows without text are dropped with a WARNING; labels come out as class ids (string labels mapped in sorted
    order, see `data_checks.label_names`); every other problem is one UserError naming the file (data_checks.py).
    """
    cache = cache_root(cfg)
    hf_cache = str(cache / "datasets")
    pct = cfg.validation_split_percentage
    if cfg.streaming:  # training rows are read when needed (stream.py); validation and the first rows are loaded
        from resumable.stream import stream_raw

        return stream_raw(cfg, cache, hf_cache)
    builder = None
    if cfg.dataset_name:
        raw = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, cache_dir=hf_cache)
        sources = {"train": f"--dataset_name {cfg.dataset_name}", "validation": f"--dataset_name {cfg.dataset_name}"}
    else:
        if cfg.train_file:
            files = {"train": cfg.train_file}
            if cfg.validation_file:
                files["validation"] = cfg.validation_file
            sources = {
                "train": f"--train_file {cfg.train_file}",
                "validation": f"--validation_file {cfg.validation_file}",
            }
        else:
            build = {"causal_lm": build_lm_corpus, "seq2seq": build_s2s_corpus}.get(cfg.task, build_cls_corpus)
            files = {k: str(v) for k, v in build(cache, pct).items()}
            sources = {k: f"embedded corpus {v}" for k, v in files.items()}
        builder = BUILDERS[Path(files["train"]).suffix]
        if "validation" in files and BUILDERS[Path(files["validation"]).suffix] != builder:
            raise UserError(
                f"{sources['train']} and {sources['validation']}: different formats "
                f"({Path(files['train']).suffix} and {Path(files['validation']).suffix}); use one format for both"
            )
        try:
            raw = datasets.load_dataset(builder, data_files=files, cache_dir=hf_cache)
        except Exception as err:  # parse errors from pyarrow/pandas are user errors about a file: find which
            raise diagnose_load_failure(builder, files, sources, err, hf_cache) from None
    if "train" not in raw:
        raise UserError(f"{sources['train']}: no 'train' split (splits: {', '.join(raw)})")
    keep_blank = builder == "text"  # a blank line of a .txt file is a paragraph break, not a missing cell
    train = clean_split(cfg, raw["train"], sources["train"], keep_blank)
    if "validation" in raw:
        names = getattr(train.features.get(cfg.label_column), "names", None)
        val = clean_split(cfg, raw["validation"], sources["validation"], keep_blank, names)
        return datasets.DatasetDict(train=train, validation=val)
    return _hold_out(train, pct, cfg.seed, sources["train"])


def _hold_out(train: datasets.Dataset, pct: int, seed: int, source: str) -> datasets.DatasetDict:
    try:
        parts = train.train_test_split(test_size=pct / 100, seed=seed)
    except ValueError:  # too few rows to split
        raise UserError(
            f"{source}: {len(train)} example(s) are too few to hold out {pct}% for validation "
            "(add rows, or pass a --validation_file)"
        ) from None
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


# --- tokenizer


def load_tokenizer(cfg: TrainConfig, raw: datasets.DatasetDict) -> PreTrainedTokenizerBase:
    """The named tokenizer, the pretrained model's, or a byte-level BPE trained on the training split (cached)."""
    name = cfg.tokenizer_name or cfg.model_name_or_path
    if name is None:
        name = str(_train_bpe(cfg, raw["train"]))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)  # the same loading path for trained and pretrained ones
    except (OSError, ValueError) as err:  # offline without a cached copy, a folder without tokenizer files, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not (cfg.tokenizer_name or cfg.model_name_or_path):  # our own cache, damaged
            raise UserError(f"trained tokenizer cache {name} is unreadable ({first}); delete that folder") from None
        flag = "--tokenizer_name" if cfg.tokenizer_name else "--model_name_or_path"
        raise UserError(f"{flag} {name}: cannot load its tokenizer ({first})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bpe_cache_dir(cfg: TrainConfig, train: datasets.Dataset) -> Path:
    """Where the BPE tokenizer trained on `train` is cached: keyed by the data's fingerprint and the settings."""
    columns = ":".join(cfg.text_columns)
    key = hashlib.sha256(f"{train._fingerprint}:{columns}:{cfg.vocab_size}:{cfg.task}:v1".encode()).hexdigest()
    return cache_root(cfg) / "tokenizers" / key[:16]


def _train_bpe(cfg: TrainConfig, train: datasets.Dataset) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    target = bpe_cache_dir(cfg, train)
    if (target / "tokenizer.json").exists():
        return target
    log.info(f"Training a byte-level BPE tokenizer (vocabulary {cfg.vocab_size}) on {len(train)} training texts (once)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, PAD, CLS]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar prints blank lines into logs; the INFO line above says what runs
    )
    texts = (row[c] for row in train for c in cfg.text_columns)
    tok.train_from_iterator((t for t in texts if t), trainer=trainer, length=len(train))  # None: an empty cell
    if cfg.task == "sequence_classification":  # BERT-style pooling reads the first token
        tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, 2)])
    if cfg.task == "seq2seq":  # T5-style: sources and targets end with EOS
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD)
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # one per builder
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a half-saved tokenizer is never picked up
    except OSError:  # another builder (another node on a shared cache) renamed its identical copy first
        if not (target / "tokenizer.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- tokenization


def tokenize_datasets(
    cfg: TrainConfig, raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized train and validation sets (cached by `datasets`: a second run re-tokenizes nothing)."""
    text = cfg.text_column
    log.info(f"Tokenizing {sum(len(ds) for ds in raw.values())} texts (cached: a rerun with the same data reuses it)")
    common = {"batched": True, "num_proc": cfg.preprocessing_num_workers, "load_from_cache_file": True}
    if cfg.task == "causal_lm":
        eos = tokenizer.eos_token_id
        block = cfg.block_size

        def tokenize(batch):
            ids = tokenizer(batch[text], add_special_tokens=False)["input_ids"]
            return {"input_ids": [x + [eos] for x in ids]}  # EOS separates documents in the stream

        def group(batch):
            flat = [t for ids in batch["input_ids"] for t in ids]
            usable = len(flat) // block * block
            chunks = [flat[i : i + block] for i in range(0, usable, block)]
            return {"input_ids": chunks, "labels": [c[:] for c in chunks]}

        out = {}
        for split, ds in raw.items():
            tok = ds.map(tokenize, remove_columns=ds.column_names, desc="tokenize", **common)
            out[split] = tok.map(group, desc=f"group into {block}-token blocks", **common)
    elif cfg.task == "seq2seq":
        out = tokenize_pairs(cfg, raw, tokenizer, common)
    else:
        labels = cfg.label_column

        def tokenize(batch):
            enc = tokenizer(batch[text], truncation=True, max_length=cfg.max_seq_length)
            enc["labels"] = batch[labels]
            return enc

        # labels are already class ids in range (checked and mapped by load_raw_datasets)
        out = {
            split: ds.map(tokenize, remove_columns=ds.column_names, desc="tokenize", **common)
            for split, ds in raw.items()
        }
    train, val = out["train"], out["validation"]
    if cfg.streaming:  # tokenized as it is read; its first rows (tokenized here) serve the unigram baseline
        from resumable.stream import packed_stream

        train = packed_stream(cfg, raw.shards, tokenizer, head=train.with_format("torch"))
    elif len(train) == 0:
        raise UserError(f"training data yields no {cfg.block_size}-token block (lower --block_size)")
    if cfg.max_train_samples:  # (not with --streaming)
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.select(range(min(cfg.max_eval_samples, len(val))))
    if cfg.task == "seq2seq":  # lists for DataCollatorForSeq2Seq to pad; the texts stay out of the batches
        return train.with_format(None, columns=MODEL_COLUMNS), val.with_format(None, columns=MODEL_COLUMNS)
    return (train if cfg.streaming else train.with_format("torch")), val.with_format("torch")


# --- loaders


def build_dataloaders(
    cfg: TrainConfig, train: datasets.Dataset, val: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
) -> tuple[DataLoader, DataLoader]:
    collate = collator(cfg, tokenizer)
    common = {"collate_fn": collate, "num_workers": cfg.dataloader_num_workers}
    train_dl = (
        train
        if isinstance(train, IterableDataset)
        else DataLoader(  # a stream: its feed reads it
            train,
            shuffle=True,
            batch_size=cfg.per_device_train_batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
            **common,
        )
    )
    eval_dl = DataLoader(
        val, batch_size=cfg.per_device_eval_batch_size, generator=torch.Generator().manual_seed(cfg.seed), **common
    )
    return train_dl, eval_dl


def collator(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase):
    """Fixed blocks as they are; dynamic padding for classification, and for seq2seq labels padded with -100."""
    if cfg.task == "causal_lm":
        return default_data_collator
    if cfg.task == "seq2seq":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return DataCollatorWithPadding(tokenizer)

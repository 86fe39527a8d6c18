"""Data: the embedded corpora are deterministic, the tokenizer loads through AutoTokenizer, tokenization is cached."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from conftest import PYTHON, REPO

from resumable.config import parse_config
from resumable.corpus import build_cls_corpus, build_lm_corpus
from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets
from resumable.errors import UserError


def test_lm_corpus_builds_identically_twice_and_splits_by_file(tmp_path):
    a = build_lm_corpus(tmp_path / "a")
    b = build_lm_corpus(tmp_path / "b")
    for split in ("train", "validation"):
        assert a[split].read_bytes() == b[split].read_bytes()
    paths = {s: {json.loads(line)["path"] for line in a[s].open()} for s in a}
    assert paths["train"] and paths["validation"] and not paths["train"] & paths["validation"]


def test_classification_corpus_is_deterministic_balanced_and_labelled_by_origin(tmp_path):
    a = build_cls_corpus(tmp_path / "a", max_per_class=300)
    b = build_cls_corpus(tmp_path / "b", max_per_class=300)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    rows = [json.loads(line) for line in a["train"].open()]
    assert sum(r["label"] for r in rows) == 300 and len(rows) == 600
    for r in rows:
        in_tests = any(part in ("test", "tests", "idle_test") for part in r["path"].split("/")[:-1])
        assert r["label"] == int(in_tests or r["path"].split("/")[-1].startswith("test_"))
        assert r["text"].lstrip().startswith(("def ", "async def "))


def test_trained_tokenizer_is_cached_and_loaded_through_autotokenizer(tmp_path):
    cfg = parse_config(["--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), "--vocab_size", "400"])
    raw = load_raw_datasets(cfg)
    tok = load_tokenizer(cfg, raw)
    saved = list((tmp_path / "c" / "tokenizers").iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").exists()
    assert len(tok) == 400 and tok.eos_token == "<|endoftext|>"
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    mtime = (saved[0] / "tokenizer.json").stat().st_mtime_ns
    load_tokenizer(cfg, raw)
    assert (saved[0] / "tokenizer.json").stat().st_mtime_ns == mtime  # not retrained


def test_a_second_process_retokenizes_nothing(tmp_path):
    """datasets' .map cache must hit across processes: the second run creates no new cache file."""
    script = textwrap.dedent(f"""
        import json, sys
        from resumable.config import parse_config
        from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets
        cfg = parse_config(["--output_dir", "o", "--cache_dir", {str(tmp_path)!r}, "--vocab_size", "400"])
        raw = load_raw_datasets(cfg)
        train, val = tokenize_datasets(cfg, raw, load_tokenizer(cfg, raw))
        print(json.dumps(sorted(f["filename"] for f in train.cache_files + val.cache_files)))
    """)

    def cache_files():
        return sorted(str(p) for p in (tmp_path / "datasets").rglob("cache-*.arrow"))

    first = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    files_after_first = cache_files()
    second = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(second.stdout) == json.loads(first.stdout)
    assert cache_files() == files_after_first and files_after_first


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_user_files_of_each_format_load(tmp_path, suffix):
    lines = [f"line number {i} of some training text" for i in range(40)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".csv":
        path.write_text("text\n" + "\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = parse_config(
        ["--output_dir", "o", "--cache_dir", str(tmp_path / "c"), "--train_file", str(path), "--block_size", "8"]
    )
    raw = load_raw_datasets(cfg)
    assert len(raw["train"]) + len(raw["validation"]) == 40
    train, _ = tokenize_datasets(cfg, raw, load_tokenizer(cfg, raw))
    assert train[0]["input_ids"].shape == (8,)


def test_missing_text_column_names_the_file_and_the_flag(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"content": "hello"}\n' * 30)
    cfg = parse_config(["--output_dir", "o", "--cache_dir", str(tmp_path / "c"), "--train_file", str(path)])
    with pytest.raises(UserError, match=r"--train_file .*train\.jsonl: no column 'text' \(set --text_column"):
        load_raw_datasets(cfg)

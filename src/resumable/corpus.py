"""The embedded default data: real corpora built from the Python standard library every install ships.

- causal LM: the source of the stdlib's top-level modules, split into train/validation by file.
- classification: functions extracted from the stdlib, labelled 1 if they come from its test suite, else 0.
- seq2seq (code summarization): a documented library function without its docstring -> its docstring's first line.
The split is a hash of the file's relative path, so it is the same on every machine with the same Python.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

from resumable.logs import get_logger
from resumable.preemption import inject_delay

log = get_logger(__name__)
TEST_DIRS = {"test", "tests", "idle_test"}
CLS_LABEL_NAMES = ("library code", "test code")  # what the classification corpus's labels 0 and 1 mean


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(key: str) -> int:
    """A stable 0..99 bucket for a string (Python's hash() is salted per process)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100


def _split_of(relpath: str, validation_percentage: int) -> str:
    return "validation" if _bucket(relpath) < validation_percentage else "train"


def _is_test_code(rel: Path) -> bool:
    return bool(TEST_DIRS & set(rel.parts[:-1])) or rel.name.startswith("test_")


def _library_files(root: Path, pattern: str) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__", "lib2to3"}  # lib2to3 holds Python 2 test data
    return sorted(p for p in root.glob(pattern) if not skip & set(p.relative_to(root).parts))


def _fingerprint(files: list[Path], root: Path, *params) -> str:
    h = hashlib.sha256(repr((sys.version, params)).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def _write_splits(target: Path, records: dict[str, list[dict]]) -> dict[str, Path]:
    """Write `{split}.jsonl` atomically: a crashed build leaves no half corpus behind."""
    if not target.exists():
        inject_delay("build_corpus")
        tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # one per builder
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split, rows in records.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race with identical content
            shutil.rmtree(tmp, ignore_errors=True)
    return {split: target / f"{split}.jsonl" for split in records}


def build_lm_corpus(cache: Path, validation_percentage: int = 5) -> dict[str, Path]:
    """Train/validation jsonl files of {"text", "path"} records: one per top-level stdlib module."""
    root = stdlib_root()
    files = _library_files(root, "*.py")
    target = cache / "corpora" / f"stdlib_lm-{_fingerprint(files, root, validation_percentage)}"
    if target.exists():
        return {s: target / f"{s}.jsonl" for s in ("train", "validation")}
    log.info(f"Building the embedded LM corpus: {len(files)} modules of the Python standard library in {root} (once)")
    records: dict[str, list[dict]] = {"train": [], "validation": []}
    for f in files:
        rel = str(f.relative_to(root))
        text = f.read_text(encoding="utf-8", errors="replace")
        records[_split_of(rel, validation_percentage)].append({"text": text, "path": rel})
    return _write_splits(target, records)


def _definitions(tree: ast.Module):
    """Every statement, nested ones included, without visiting expressions: a `def` is always a statement, and
    skipping the expression nodes makes this several times faster than `ast.walk`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(node, field, None) or ())


def _parse(path: Path) -> tuple[ast.Module, list[str]] | None:
    """A stdlib file's syntax tree and lines; None for the few deliberately broken files of its own tests."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # old escape sequences in the stdlib's own test data
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    return tree, source.splitlines(keepends=True)  # ast.get_source_segment re-splits per call: quadratic


def _functions(path: Path, rel: str) -> list[dict]:
    if (parsed := _parse(path)) is None:
        return []
    tree, lines = parsed
    out = []
    for node in _definitions(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            if text.count("\n") >= 3:  # one-liners carry too little signal
                out.append({"text": text, "path": rel, "name": node.name, "line": node.lineno})
    return out


def build_cls_corpus(cache: Path, validation_percentage: int = 5, max_per_class: int = 2500) -> dict[str, Path]:
    """Train/validation jsonl of {"text", "label"}: stdlib functions, label 1 = from the test suite.

    Each class is capped at `max_per_class` training examples (and proportionally for validation), chosen by
    a stable hash, so both classes are present and the build stays fast.
    """
    root = stdlib_root()
    files = _library_files(root, "**/*.py")
    key = _fingerprint(files, root, validation_percentage, max_per_class)
    target = cache / "corpora" / f"stdlib_cls-{key}"
    if target.exists():
        return {s: target / f"{s}.jsonl" for s in ("train", "validation")}
    log.info(f"Building the embedded classification corpus: functions of {len(files)} stdlib files in {root} (once)")
    pools: dict[tuple[str, int], list[dict]] = {}
    for f in files:
        rel = f.relative_to(root)
        label = int(_is_test_code(rel))
        split = _split_of(str(rel), validation_percentage)
        pools.setdefault((split, label), []).extend(_functions(f, str(rel)))
    cap = {"train": max_per_class, "validation": max(1, max_per_class * validation_percentage // 100)}
    records: dict[str, list[dict]] = {"train": [], "validation": []}
    for (split, label), rows in sorted(pools.items()):
        rows.sort(key=lambda r: hashlib.sha1(f"{r['path']}:{r['line']}".encode()).hexdigest())
        records[split] += [{"text": r["text"], "label": label, "path": r["path"]} for r in rows[: cap[split]]]
    for rows in records.values():  # stable, interleaved order independent of the pool order above
        rows.sort(key=lambda r: hashlib.sha1(r["text"].encode()).hexdigest())
    return _write_splits(target, records)


def _documented_functions(path: Path, rel: str) -> list[dict]:
    """{"source": the function without its docstring, "target": the docstring's first line} of `path`."""
    if (parsed := _parse(path)) is None:
        return []
    tree, lines = parsed
    out = []
    for node in _definitions(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        summary = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        summary = re.sub(r":\w+:|[`*]", "", summary)  # reST markup (``x``, :func:`y`) is not the summary
        if len(summary.split()) < 3:  # "Internal." and the like say nothing
            continue
        first, last = node.body[0].lineno - 1, node.body[0].end_lineno  # the docstring's lines
        body = lines[node.lineno - 1 : first] + lines[last : node.end_lineno]
        out.append({"source": textwrap.dedent("".join(body)), "target": summary, "path": rel, "line": node.lineno})
    return out


def build_s2s_corpus(cache: Path, validation_percentage: int = 5, max_train: int = 8000) -> dict[str, Path]:
    """Train/validation jsonl of {"source", "target"}: stdlib library functions and their docstrings' first lines.

    Split by file; at most `max_train` training pairs (and proportionally for validation), chosen by a stable hash.
    """
    root = stdlib_root()
    files = [f for f in _library_files(root, "**/*.py") if not _is_test_code(f.relative_to(root))]
    key = _fingerprint(files, root, validation_percentage, max_train, "v2")  # v2: reST markup stripped
    target = cache / "corpora" / f"stdlib_s2s-{key}"
    if target.exists():
        return {s: target / f"{s}.jsonl" for s in ("train", "validation")}
    log.info(f"Building the embedded seq2seq corpus: documented functions of {len(files)} stdlib files (once)")
    records: dict[str, list[dict]] = {"train": [], "validation": []}
    for f in files:
        rel = str(f.relative_to(root))
        records[_split_of(rel, validation_percentage)].extend(_documented_functions(f, rel))
    cap = {"train": max_train, "validation": max(1, max_train * validation_percentage // 100)}
    for split, rows in records.items():
        rows.sort(key=lambda r: hashlib.sha1(f"{r['path']}:{r['line']}".encode()).hexdigest())
        records[split] = [{"source": r["source"], "target": r["target"], "path": r["path"]} for r in rows[: cap[split]]]
    return _write_splits(target, records)

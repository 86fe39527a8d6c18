"""Bad datasets and model limits: rows without text are dropped and said so; everything else training cannot use is
one line naming the flag or file, exit 2, before anything in the output dir is created or changed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import datasets
import pytest
from conftest import PYTHON, REPO, TINY_CLS, TINY_LM, TRAIN

from resumable.config import parse_config
from resumable.corpus import CLS_LABEL_NAMES
from resumable.data import load_raw_datasets, load_tokenizer, tokenize_datasets
from resumable.data_checks import clean_split, label_names
from resumable.errors import UserError
from resumable.modeling import check_model_limits


def messy_csv(path: Path, rows: int = 1200, empty: int = 23, labels: list | None = None) -> Path:
    """A CSV as exported by a spreadsheet: quotes, commas and newlines inside cells, and `empty` empty text cells."""
    empty_rows = {round(i * rows / empty) + 3 for i in range(empty)}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"] if labels else ["text"])
        for i in range(rows):
            text = "" if i in empty_rows else f'def f{i}(x, y):\n    """Say "hi", {i} times."""\n    return x, y\n'
            writer.writerow([text, labels[i % len(labels)]] if labels else [text])
    return path


def config(tmp_path: Path, *flags: str):
    return parse_config(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "c"), *flags])


# --- empty cells are dropped, with one line


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_empty_text_cells_of_a_messy_csv_are_dropped_with_one_warning(tmp_path, caplog, task):
    labels = ["spam", "ham"] if task == "sequence_classification" else None
    path = messy_csv(tmp_path / "messy.csv", labels=labels)
    cfg = config(tmp_path, "--task", task, "--train_file", str(path), "--vocab_size", "400", "--block_size", "16")
    with caplog.at_level("INFO", logger="resumable"):
        raw = load_raw_datasets(cfg)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == [f"--train_file {path}: dropped 23 of 1200 rows whose 'text' is empty"]
    assert len(raw["train"]) + len(raw["validation"]) == 1200 - 23
    assert all(raw[s][i]["text"] for s in raw for i in range(len(raw[s])))
    assert '"hi", ' in raw["train"][0]["text"] and "\n" in raw["train"][0]["text"]  # the quoting survived
    tokenizer = load_tokenizer(cfg, raw)  # crashed with "'NoneType' object is not iterable"
    train, val = tokenize_datasets(cfg, raw, tokenizer)
    assert len(train) and len(val)
    if task == "sequence_classification":  # string labels: ids in sorted order, the same on every run
        assert raw["train"].features["label"].names == ["ham", "spam"]
        assert label_names(cfg, raw) == ["ham", "spam"]
        assert {int(y) for y in train["labels"]} == {0, 1}


def test_a_classification_row_without_text_is_dropped_even_with_a_bad_label(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)) + ",7\n,\n")
    raw = load_raw_datasets(config(tmp_path, "--task", "sequence_classification", "--train_file", str(path)))
    assert len(raw["train"]) + len(raw["validation"]) == 20


def test_blank_lines_of_a_text_file_are_content_not_dropped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"paragraph {i}\n\n" for i in range(20)))
    raw = load_raw_datasets(config(tmp_path, "--train_file", str(path)))
    assert len(raw["train"]) + len(raw["validation"]) == 40


# --- bad datasets, in-process (fast): the exact line


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


GOOD = "text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train_file": "text,label\n"}, "--train_file {train_file}: no examples (the file has no data rows)"),
        ({"train_file": GOOD, "validation_file": "text,label\n"}, "--validation_file {validation_file}: no examples"),
        ({"train_file": "text,label\n,1\n,0\n"}, "--train_file {train_file}: column 'text' is empty in every row"),
        ({"train_file": "body,label\nx,1\n"}, "no column 'text' (set --text_column; columns: body, label)"),
        ({"train_file": GOOD + "bad,-1\n"}, "--train_file {train_file}: label -1 at row 21 is outside 0..1"),
        ({"train_file": GOOD.replace("text 7,1", "text 7,5")}, "label 5 at row 8 is outside 0..1 (--num_labels 2)"),
        ({"train_file": GOOD.replace("text 7,1", "text 7,")}, "--train_file {train_file}: row 8 has no label"),
        ({"train_file": GOOD.replace("text 7,1", "text 7,0.5")}, "label 0.5 at row 8 is not a class id"),
        ({"train_file": "text,label\na,x\nb,y\nc,z\n"}, "--num_labels 2: --train_file {train_file} has 3 classes"),
        (
            {"train_file": "text,label\na,x\nb,y\n", "validation_file": "text,label\na,x\nb,w\n"},
            "--validation_file {validation_file}: label 'w' at row 2 is not one of the training data's labels (x, y)",
        ),
        (
            {"train_file": GOOD, "validation_file": "body,label,id\nx,1,3\n"},
            "--train_file {train_file} and --validation_file {validation_file} have different columns (only in the "
            "training file: text; only in the validation file: body, id)",
        ),
        ({"train_file": "text,label\na,1\n"}, "1 example(s) are too few to hold out 5% for validation"),
        ({"train_file": "text,label\n1,1\n2,0\n"}, "column 'text' holds int64 values, not text"),
    ],
)
def test_each_bad_classification_file_is_one_line_naming_it(tmp_path, files, message):
    paths = {flag: write(tmp_path / f"{flag}.csv", text) for flag, text in files.items()}
    flags = [x for flag, path in paths.items() for x in (f"--{flag}", path)]
    cfg = config(tmp_path, "--task", "sequence_classification", *flags)
    with pytest.raises(UserError) as err:
        load_raw_datasets(cfg)
    assert message.format(**paths) in str(err.value) and "\n" not in str(err.value)


def test_string_labels_map_to_the_same_sorted_ids_whatever_the_row_order(tmp_path):
    rows = [("a", "pos"), ("b", "neg"), ("c", "neutral")] * 10
    ids = []
    for order in (rows, rows[::-1]):
        path = write(tmp_path / "t.csv", "text,label\n" + "".join(f"{t},{y}\n" for t, y in order))
        cfg = config(tmp_path, "--task", "sequence_classification", "--num_labels", "3", "--train_file", path)
        raw = load_raw_datasets(cfg)
        assert label_names(cfg, raw) == ["neg", "neutral", "pos"]
        train = raw["train"]
        ids.append({train[i]["text"]: train[i]["label"] for i in range(len(train))})
    assert ids[0] == ids[1] and ids[0]["b"] == 0 and ids[0]["a"] == 2


def test_class_label_names_of_a_hub_dataset_and_of_the_embedded_corpus_become_label_names(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    hub = datasets.Dataset.from_dict({"text": ["good", "bad", "meh"], "label": [1, 0, -1]}, features=features)
    cfg = config(tmp_path, "--task", "sequence_classification", "--dataset_name", "someone/reviews")
    assert label_names(cfg, datasets.DatasetDict(train=hub)) == ["neg", "pos"]
    with pytest.raises(UserError, match=r"--dataset_name someone/reviews: row 3 has no label"):
        clean_split(cfg, hub, "--dataset_name someone/reviews", keep_blank=False)  # -1: ClassLabel's "no label"
    embedded = config(tmp_path, "--task", "sequence_classification")
    plain = datasets.Dataset.from_dict({"text": ["x"], "label": [1]})
    assert (
        label_names(embedded, datasets.DatasetDict(train=plain))
        == list(CLS_LABEL_NAMES)
        == ["library code", "test code"]
    )


def test_a_hub_dataset_with_more_classes_than_num_labels_names_the_flag(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list("abc"))})
    hub = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 2]}, features=features)
    cfg = config(tmp_path, "--task", "sequence_classification", "--dataset_name", "someone/three")
    with pytest.raises(UserError, match=r"^--num_labels 2: --dataset_name someone/three has 3 classes \(a, b, c\)"):
        clean_split(cfg, hub, "--dataset_name someone/three", keep_blank=False)


# --- model limits, checked from the config alone


def test_model_limits_follow_config_overrides_of_the_from_scratch_model(tmp_path):
    check_model_limits(config(tmp_path, "--block_size", "2048"))  # from scratch, the table is sized to fit
    too_small = config(tmp_path, "--block_size", "64", "--config_overrides", "n_positions=32")
    with pytest.raises(UserError, match=r"^--block_size 64 exceeds the 32 positions of the gpt2 model"):
        check_model_limits(too_small)
    cls = config(tmp_path, "--task", "sequence_classification", "--max_seq_length", "64",
                 "--config_overrides", "max_position_embeddings=48")  # fmt: skip
    with pytest.raises(UserError, match=r"^--max_seq_length 64 exceeds the 48 positions of the bert model"):
        check_model_limits(cls)


def test_model_limits_of_a_pretrained_model_come_from_its_config_and_count_roberta_padding(tmp_path):
    from transformers import GPT2Config, RobertaConfig

    GPT2Config(n_positions=128, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt")
    check_model_limits(config(tmp_path, "--model_name_or_path", str(tmp_path / "gpt"), "--block_size", "128"))
    with pytest.raises(UserError, match=r"--block_size 129 exceeds the 128 positions of .*gpt; use --block_size 128"):
        check_model_limits(config(tmp_path, "--model_name_or_path", str(tmp_path / "gpt"), "--block_size", "129"))
    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path / "rob")
    cls = ["--task", "sequence_classification", "--model_name_or_path", str(tmp_path / "rob")]
    check_model_limits(config(tmp_path, *cls, "--max_seq_length", "512"))
    with pytest.raises(UserError, match=r"--max_seq_length 513 exceeds the 512 positions"):
        check_model_limits(config(tmp_path, *cls, "--max_seq_length", "513"))


def test_a_pretrained_model_without_a_config_is_one_line(tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(UserError, match=r"^--model_name_or_path .*empty_model: cannot load its config \("):
        check_model_limits(config(tmp_path, "--model_name_or_path", str(tmp_path / "empty_model")))


# --- end to end: exit 2, one line, the output dir untouched


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = {
    "header_only_train": (["--train_file", "{d}/train.csv"], {"train.csv": "text,label\n"},
                          "--train_file {d}/train.csv: no examples (the file has no data rows)"),
    "validation_all_empty": (["--train_file", "{d}/train.csv", "--validation_file", "{d}/val.csv"],
                             {"train.csv": GOOD, "val.csv": "text,label\n,1\n,0\n,1\n"},
                             "--validation_file {d}/val.csv: column 'text' is empty in every row (3 rows)"),
    "text_missing": (["--train_file", "{d}/train.csv"], {"train.csv": GOOD.replace("text,", "body,", 1)},
                     "--train_file {d}/train.csv: no column 'text' (set --text_column; columns: body, label)"),
    "label_too_big": (["--train_file", "{d}/train.csv"], {"train.csv": GOOD.replace("text 3,1", "text 3,2")},
                      "--train_file {d}/train.csv: label 2 at row 4 is outside 0..1 (--num_labels 2)"),
    "columns_differ": (["--train_file", "{d}/train.csv", "--validation_file", "{d}/val.csv"],
                       {"train.csv": GOOD, "val.csv": "content,label\nx,1\n"},
                       "--train_file {d}/train.csv and --validation_file {d}/val.csv have different columns (only in "
                       "the training file: text; only in the validation file: content); give both files the same "
                       "columns"),
    "max_seq_length_too_long": (["--train_file", "{d}/train.csv", "--max_seq_length", "64", "--config_overrides",
                                 "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
                                 "max_position_embeddings=48"], {"train.csv": GOOD},
                                "--max_seq_length 64 exceeds the 48 positions of the bert model (--config_overrides); "
                                "use --max_seq_length 48 or less"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_through_train_py_is_one_line_exit_2_and_touches_nothing(tmp_path, cache_dir, case):
    flags, files, message = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree(out)
    argv = [*TINY_CLS, *[f.format(d=data) for f in flags], "--output_dir", str(out), "--cache_dir", str(cache_dir)]
    result = subprocess.run([PYTHON, TRAIN, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {message.format(d=data)}"], result.stderr[-3000:]
    assert tree(out) == before  # not even train.log


def test_block_size_beyond_the_model_through_train_py_leaves_no_output_dir(tmp_path, cache_dir):
    out = tmp_path / "never"
    argv = [*TINY_LM, "--block_size", "64", "--config_overrides", "n_layer=1,n_embd=32,n_head=2,n_positions=32"]
    result = subprocess.run([PYTHON, TRAIN, *argv, "--output_dir", str(out), "--cache_dir", str(cache_dir)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --block_size 64 exceeds the 32 positions of the gpt2 model (--config_overrides); "
        "use --block_size 32 or less"
    )
    assert not out.exists()


# --- exported models take long inputs and name their labels

LONG = " ".join(f"word{i % 97}" for i in range(5000))


def test_exported_lm_tokenizer_truncates_to_the_model_positions(tmp_path):
    from transformers import AutoTokenizer

    from resumable.export import save_pretrained_atomically
    from resumable.modeling import build_model

    cfg = config(tmp_path, *TINY_LM)
    raw = load_raw_datasets(cfg)
    tokenizer = load_tokenizer(cfg, raw)
    assert tokenizer.model_max_length > 10**6  # as trained: "no limit"
    save_pretrained_atomically(build_model(cfg, tokenizer), tokenizer, tmp_path / "final")
    saved = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert saved.model_max_length == 32
    assert len(saved(LONG, truncation=True)["input_ids"]) <= 32


def test_exported_classifier_names_its_labels_and_takes_a_long_input_in_a_pipeline(tmp_path):
    from transformers import pipeline

    from resumable.export import save_pretrained_atomically
    from resumable.modeling import build_model

    path = messy_csv(tmp_path / "reviews.csv", rows=200, empty=5, labels=["spam", "ham"])
    cfg = config(tmp_path, *TINY_CLS, "--train_file", str(path))
    raw = load_raw_datasets(cfg)
    tokenizer = load_tokenizer(cfg, raw)
    model = build_model(cfg, tokenizer, label_names(cfg, raw))
    save_pretrained_atomically(model, tokenizer, tmp_path / "final")
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["id2label"] == {"0": "ham", "1": "spam"} and saved["label2id"] == {"ham": 0, "spam": 1}
    classify = pipeline("text-classification", model=str(tmp_path / "final"), device="cpu")
    assert classify(LONG, truncation=True)[0]["label"] in ("ham", "spam")


@pytest.fixture(scope="module")
def classifier_final(tmp_path_factory, cache_dir) -> Path:
    """final/ of a tiny classification run through scripts/train.py on a messy CSV with string labels."""
    tmp = tmp_path_factory.mktemp("cls_run")
    path = messy_csv(tmp / "reviews.csv", rows=300, empty=7, labels=["spam", "ham"])
    argv = [*TINY_CLS, "--train_file", str(path), "--max_steps", "3", "--output_dir", str(tmp / "run"),
            "--cache_dir", str(cache_dir)]  # fmt: skip
    result = subprocess.run([PYTHON, TRAIN, *argv], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--train_file {path}: dropped 7 of 300 rows whose 'text' is empty" in result.stderr
    return tmp / "run" / "final"


@pytest.mark.slow
def test_final_of_a_classification_run_takes_a_5000_word_input_in_a_pipeline(classifier_final):
    from transformers import AutoTokenizer, pipeline

    assert AutoTokenizer.from_pretrained(classifier_final).model_max_length == 48  # was 1e30 with 48 positions
    classify = pipeline("text-classification", model=str(classifier_final), device="cpu")
    assert classify(LONG, truncation=True)[0]["score"] > 0  # a size mismatch before


@pytest.mark.slow
def test_final_of_a_classification_run_names_its_labels(classifier_final):
    from transformers import pipeline

    names = json.loads((classifier_final / "config.json").read_text())["id2label"]
    assert names == {"0": "ham", "1": "spam"}
    classify = pipeline("text-classification", model=str(classifier_final), device="cpu")
    assert classify("def test_it():\n    assert True\n")[0]["label"] in ("ham", "spam")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "gpt2"], "error: --model_name_or_path gpt2: cannot load its config ("),
        (["--tokenizer_name", "{empty}"], "error: --tokenizer_name {empty}: cannot load its tokenizer ("),
    ],
    ids=["hub_model_offline", "tokenizer_folder_without_files"],
)
def test_a_model_or_tokenizer_that_cannot_be_loaded_is_one_line_exit_2(tmp_path, cache_dir, flags, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # nothing cached
    argv = [*TINY_LM, *[f.format(empty=empty) for f in flags], "--output_dir", str(tmp_path / "run"),
            "--cache_dir", str(cache_dir)]  # fmt: skip
    result = subprocess.run([PYTHON, TRAIN, *argv], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message.format(empty=empty)), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()

"""--task seq2seq (T5 from config, code summarization of the stdlib): the same promise as the other tasks."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import PYTHON, REPO, TINY_S2S, TRAIN, Run, assert_bitwise_same_run, ok, train_records
from test_resume_exact import kill_and_resume, reference

from resumable.corpus import build_s2s_corpus
from resumable.seq2seq import name_words, scores


def test_the_embedded_corpus_pairs_functions_without_docstrings_with_their_first_line(tmp_path):
    files = build_s2s_corpus(tmp_path)
    again = build_s2s_corpus(tmp_path / "other")
    rows = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in files.items()}
    assert {s: p.read_text() for s, p in files.items()} == {s: again[s].read_text() for s in again}  # deterministic
    assert len(rows["train"]) > 5000 and len(rows["validation"]) >= 100  # every documented library function
    assert not {r["path"] for r in rows["train"]} & {r["path"] for r in rows["validation"]}  # split by file
    for row in rows["train"][:200]:
        assert row["source"].lstrip().startswith(("def ", "async def ", "@"))
        assert row["target"] not in row["source"]  # the docstring is gone
        assert "\n" not in row["target"] and len(row["target"].split()) >= 3


def test_scores_and_the_name_baseline():
    assert name_words("def read_configFile(path):\n    pass\n") == "read config file"
    perfect = scores(["return the sum of x"], ["return the sum of x"])
    assert perfect == {"eval/rougeL": 100.0, "eval/bleu": pytest.approx(100.0)}
    assert scores(["nothing alike"], ["return the sum of x"])["eval/rougeL"] == 0.0


@pytest.mark.slow
def test_seq2seq_resumes_bitwise_and_reports_generation_scores(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_S2S)
    out, survivors, _ = kill_and_resume(tmp_path, cache_dir, TINY_S2S, kill_after_step=14)
    assert max(survivors) > 9
    assert_bitwise_same_run(ref, out)
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/loss" in r]
    ref_evals = [json.loads(line) for line in (ref / "train_log.jsonl").read_text().splitlines()]
    assert evals == [r for r in ref_evals if "eval/loss" in r]  # generated text scored the same after the resume
    assert {"eval/rougeL", "eval/bleu"} <= evals[0].keys()
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert {"eval/rougeL", "eval/bleu", "baseline/name_words/rougeL", "baseline/name_words/bleu"} <= metrics.keys()


@pytest.mark.slow
def test_seq2seq_on_two_processes_resumes_bitwise(tmp_path, tmp_path_factory, cache_dir):
    ref = reference(tmp_path_factory, cache_dir, TINY_S2S, launcher="cpu_ddp")
    out, _, _ = kill_and_resume(tmp_path, cache_dir, TINY_S2S, kill_after_step=7, launcher="cpu_ddp")
    assert_bitwise_same_run(ref, out)
    assert len(train_records(out)) == 15


@pytest.mark.slow
def test_an_exported_seq2seq_checkpoint_generates(tmp_path, tmp_path_factory, cache_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    ref = reference(tmp_path_factory, cache_dir, TINY_S2S)
    cli = [PYTHON, str(REPO / "scripts" / "checkpoints.py"), "export", str(ref / "checkpoints" / "step-00000008")]
    ok(subprocess.run([*cli, "--to", str(tmp_path / "x"), "--cache_dir", str(cache_dir)], capture_output=True,
                      text=True))  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "x")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "x")
    out = model.generate(**tokenizer(["def add(a, b):\n    return a + b\n"], return_tensors="pt"), max_new_tokens=4)
    assert out.shape[0] == 1 and model.config.decoder_start_token_id == tokenizer.pad_token_id
    # the pretrained path (what `--model_name_or_path t5-small` takes), from the locally saved model and tokenizer
    args = [a for a in TINY_S2S if a != "--config_overrides" and not a.startswith("num_layers=")]
    tuned = ok(Run([*args, "--model_name_or_path", str(tmp_path / "x"), "--max_steps", "5"], tmp_path / "ft",
                   cache_dir).run())  # fmt: skip
    assert "eval/rougeL" in json.loads(tuned.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('{"source": "def f(): pass", "summary": "does f"}\n' * 30,
         "no column 'target' (set --target_column; columns: source, summary)"),
        ('{"source": "def f(): pass", "target": ""}\n' * 30, "column 'target' is empty in every row (30 rows)"),
    ],
    ids=["target_missing", "target_empty"],
)  # fmt: skip
def test_bad_seq2seq_data_is_one_line_exit_2(tmp_path, cache_dir, rows, message):
    (tmp_path / "train.jsonl").write_text(rows)
    argv = [*TINY_S2S, "--train_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "run")]
    result = subprocess.run([PYTHON, TRAIN, *argv, "--cache_dir", str(cache_dir)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: --train_file {tmp_path / 'train.jsonl'}: {message}"], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()

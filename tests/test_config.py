"""Config: one dataclass, defaults < --config YAML < flags, and every mistake is one clear line with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, TRAIN

from resumable.config import TrainConfig, field_names, parse_config
from resumable.errors import UserError
from resumable.flag_docs import flags_markdown


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_is_defaults_then_yaml_then_flags(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "learning_rate: 0.01\nseed: 3\noutput_dir: from_yaml\n")
    cfg = parse_config(["--config", str(yaml_file), "--seed", "5"])
    assert cfg.learning_rate == 0.01  # yaml over default
    assert cfg.seed == 5  # flag over yaml
    assert cfg.output_dir == "from_yaml"
    assert cfg.per_device_train_batch_size == TrainConfig.__dataclass_fields__["per_device_train_batch_size"].default


def test_flag_before_config_still_overrides_yaml(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "seed: 3\n")
    assert parse_config(["--seed", "9", "--config", str(yaml_file), "--output_dir", "o"]).seed == 9


def test_yaml_booleans_and_nulls(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "gradient_checkpointing: true\nmax_run_time: null\noutput_dir: o\n")
    cfg = parse_config(["--config", str(yaml_file)])
    assert cfg.gradient_checkpointing is True and cfg.max_run_time is None


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "learning_rat: 0.1\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_config(["--config", str(yaml_file), "--output_dir", "o"])


def test_unknown_flag_is_an_error():
    with pytest.raises(UserError, match="unknown key 'lr'"):
        parse_config(["--output_dir", "o", "--lr", "3"])


def test_bad_yaml_value_type_names_file_and_flag(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "learning_rate: fast\n")
    with pytest.raises(UserError, match=r"c\.yaml: argument --learning_rate: invalid float value: 'fast'"):
        parse_config(["--config", str(yaml_file), "--output_dir", "o"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "--output_dir is required"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--checkpointing_steps", "-5"], "--checkpointing_steps must be >= 0"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be > 0 unless --max_steps"),
        (["--task", "translation"], "argument --task: invalid choice"),
        (["--report_to", "mlflow"], "argument --report_to: invalid choice"),
        (["--metric_for_best_model", "eval/f1"], "not a causal_lm metric"),
        (["--model_name_or_path", "gpt2", "--model_type", "gpt2"], "exclusive"),
        (["--dataset_name", "wikitext", "--train_file", "x.txt"], "exclusive"),
        (["--train_file", "missing.txt"], "--train_file missing.txt: file not found"),
        (["--train_file", "data.parquet"], "unsupported extension"),
        (["--max_run_time", "soon"], "--max_run_time 'soon'"),
        (["--stop_signals", "SIGKILL"], "--stop_signals: SIGKILL"),
        (["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    ],
)
def test_each_bad_value_is_rejected_naming_its_flag(tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    base = [] if message.startswith("--output_dir") else ["--output_dir", "out"]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(base + flags)


def test_empty_train_file_is_rejected(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty.txt: file is empty"):
        parse_config(["--output_dir", str(tmp_path / "o"), "--train_file", str(empty)])


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    f = write(tmp_path / "taken", "precious")
    with pytest.raises(UserError, match="exists and is not a directory"):
        parse_config(["--output_dir", str(f)])


def test_resume_path_without_manifest_is_rejected(tmp_path):
    from resumable.resume_plan import plan_resume

    (tmp_path / "step-00000005").mkdir()
    cfg = parse_config(
        ["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", str(tmp_path / "step-00000005")]
    )
    with pytest.raises(UserError, match="not a complete checkpoint"):
        plan_resume(cfg)
    cfg.resume_from_checkpoint = str(tmp_path / "missing")
    with pytest.raises(UserError, match="no such checkpoint directory"):
        plan_resume(cfg)


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("45m", 2700), ("90s", 90), ("7200", 7200), ("1d", 86400)])
def test_max_run_time_accepts_durations(text, seconds):
    from resumable.config import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_parses_and_validates(preset, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a preset may report to W&B; this machine is not logged in
    cfg = parse_config(["--config", str(preset)])
    assert cfg.output_dir


def test_user_error_is_one_line_exit_2_no_traceback_and_touches_nothing(tmp_path):
    """Through the real script: a bad flag must not create or change anything on disk."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in out.iterdir())
    result = subprocess.run(
        [PYTHON, TRAIN, "--output_dir", str(out), "--learning_rate", "-3"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --learning_rate must be > 0, got -3.0"
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in out.iterdir()) == before and (out / "keep.txt").read_text() == "precious"


def test_readme_flag_table_matches_the_dataclass():
    readme = (REPO / "README.md").read_text()
    assert flags_markdown() in readme, "README.md's flag table is stale: run `make docs`"
    assert all(f"`--{name}`" in readme for name in field_names())

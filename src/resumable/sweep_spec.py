"""A W&B sweep YAML (`sweeps/*.yaml`) as the offline runner reads it: checked flag by flag against `TrainConfig`,
and turned into each trial's command line the way `wandb agent` builds it (wandb's own sweep command helpers)."""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from resumable.config_checks import TASK_METRICS, require
from resumable.errors import UserError

METHODS = ("grid", "random", "bayes")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb's default
NOT_SWEPT = ("config", "output_dir")  # the runner (or the agent's run id) owns the output dir


def load_sweep(path: str) -> dict:
    """The sweep config from `path`, its shape checked (one line naming the file and the key otherwise)."""
    p = Path(path)
    require(p.is_file(), f"{path}: sweep file not found")
    try:
        sweep = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    require(isinstance(sweep, dict), f"{path}: expected a W&B sweep config (a mapping)")
    require(sweep.get("method") in METHODS, f"{path}: method must be one of {', '.join(METHODS)}")
    metric = sweep.get("metric")
    require(isinstance(metric, dict) and metric.get("name"), f"{path}: needs metric: {{name: ..., goal: ...}}")
    require(metric.get("goal", "minimize") in ("minimize", "maximize"), f"{path}: metric goal must be minimize "
            "or maximize")  # fmt: skip
    params = sweep.get("parameters")
    require(isinstance(params, dict) and params, f"{path}: needs parameters")
    for name, spec in params.items():
        require(isinstance(spec, dict), f"{path}: parameter {name!r} must be a mapping (values:, min:/max:, ...)")
    require(isinstance(sweep.get("program"), str), f"{path}: needs program: scripts/train.py")
    command = sweep.setdefault("command", list(DEFAULT_COMMAND))
    require(isinstance(command, list) and "${args}" in command, f"{path}: command must be a list with ${{args}}")
    return sweep


def agent_command(sweep: dict, params: dict[str, Any], python: str = "python") -> list[str]:
    """The command `wandb agent` runs for one proposed parameter set (wandb_agent.Agent._command_run's rules)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))
    values = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    values.update(interpreter=[python], program=[sweep["program"]], env=["/usr/bin/env"])
    built: list[str] = []
    for chunk in map(str, command):
        built += (values.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return built


def train_flags(sweep: dict, params: dict[str, Any], extra: list[str]) -> list[str]:
    """The flags scripts/train.py gets in a trial (those after the program in the command)."""
    command = agent_command(sweep, params) + extra
    require(sweep["program"] in command, f"the sweep's command never runs its program {sweep['program']}")
    return command[command.index(sweep["program"]) + 1 :]


def candidates(spec: dict) -> list[Any]:
    """The values a parameter can take that are worth checking: every listed one, or a range's two ends."""
    if "values" in spec:
        require(isinstance(spec["values"], list) and spec["values"], "values: must be a non-empty list")
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    require("min" in spec and "max" in spec, "needs values:, value: or min:/max:")
    return [spec["min"], spec["max"]]


def check_sweep(sweep: dict, path: str, extra: list[str]) -> None:
    """Every parameter is a flag of scripts/train.py, every value it can take parses and passes the flag checks
    (with the command's own flags; for a grid every combination), and the metric is one train.py logs."""
    from resumable.config import field_names, parse_config

    params = sweep["parameters"]
    for name in params:
        require(name in field_names() and name not in NOT_SWEPT, f"{path}: parameter {name!r} is not a flag of "
                f"{sweep['program']} that a sweep may set")  # fmt: skip
    for flag in extra:
        name = flag.lstrip("-").split("=", 1)[0]
        require(not (flag.startswith("--") and name in params), f"flag {flag} after -- would override the swept "
                f"parameter {name!r} in every trial")  # fmt: skip
    values: dict[str, list[Any]] = {}
    for name, spec in params.items():
        try:
            values[name] = candidates(spec)
        except UserError as err:
            raise UserError(f"{path}: parameter {name!r}: {err}") from None
    if sweep["method"] == "grid":
        sets = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    else:  # ranges: each parameter's ends, the others at their first value
        first = {k: v[0] for k, v in values.items()}
        sets = [{**first, k: v} for k, vs in values.items() for v in vs]
    with tempfile.TemporaryDirectory() as tmp:
        for chosen in sets:
            try:
                cfg = parse_config(train_flags(sweep, chosen, extra) + ["--output_dir", str(Path(tmp) / "t")])
            except UserError as err:
                shown = ", ".join(f"{k}={v}" for k, v in chosen.items())
                raise UserError(f"{path}: the trial {shown} would not start: {err}") from None
    metric = sweep["metric"]["name"]
    logged = TASK_METRICS[cfg.task] + ("train/loss",)
    logged += tuple(m.replace("eval/", f"eval_{kind}/") for m in TASK_METRICS[cfg.task] for kind in ("ema", "swa"))
    require(metric in logged, f"{path}: metric {metric!r} is not one {sweep['program']} logs for --task "
            f"{cfg.task} (choose from {', '.join(logged[:len(TASK_METRICS[cfg.task])])})")  # fmt: skip


def same_sweep(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def log_scale(name: str, sweep: dict, values: list[float]) -> bool:
    """Whether a parameter reads best on a log axis: a log distribution, or positive values spanning > 10x."""
    spec = sweep["parameters"].get(name, {})
    if "log" in str(spec.get("distribution", "")):
        return True
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(nums) and min(nums) > 0 and max(nums) / min(nums) > 10 and math.isfinite(max(nums))

"""Pre-flight: will this command train here? One line per check (`OK`, `WARN`, `FAIL`); any FAIL is a blocker.

What the teams checked by hand before a long job: library versions, the launch config (really distributed, a
precision this hardware has), the output dir and its free space, the data, the model and tokenizer offline, the
GPU, and under Slurm whether the signal lead leaves time for a step and a save. `scripts/preflight.py` prints it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from resumable.config import TrainConfig
from resumable.disk_space import Finding, check_disk, count_parameters, estimate_checkpoint_bytes
from resumable.errors import UserError
from resumable.preflight_inputs import check_data, check_model
from resumable.signal_lead import check_slurm

__all__ = ["Finding", "run_preflight", "report"]

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"  # the pins CI installs (a checkout only)
LIBRARIES = ("torch", "accelerate", "transformers", "datasets")
OPTIONAL_LIBRARIES = ("deepspeed", "wandb")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# --- versions


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _same_version(installed: str, pinned: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:  # a local build tag is the same release: torch 2.13.0+cpu satisfies a 2.13.0 pin
        return Version(installed).public == Version(pinned).public
    except InvalidVersion:
        return installed == pinned


def check_versions(constraints: Path | None = CONSTRAINTS) -> list[Finding]:
    """Versions of what the run imports, and a WARN for each that differs from constraints.txt (what CI tests)."""
    pins = _pins(constraints) if constraints is not None and constraints.is_file() else {}
    found, findings = [f"python {platform.python_version()}"], []
    for name in LIBRARIES + OPTIONAL_LIBRARIES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in LIBRARIES:
                findings.append(Finding("FAIL", "versions", f"{name} is not installed (pip install -e .)"))
            continue
        found.append(f"{name} {version}")
        pin = pins.get(name)
        if pin and not _same_version(version, pin):
            findings.append(Finding("WARN", "versions", f"{name} {version} differs from constraints.txt's {pin}"))
    note = "" if pins else " (no constraints.txt to compare with)"
    return [Finding("OK", "versions", ", ".join(found) + note), *findings]


# --- hardware and the launch config


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def check_gpu() -> Finding:
    import torch

    if not torch.cuda.is_available():
        return Finding("OK", "gpu", f"no GPU: CPU run ({os.cpu_count()} CPU cores)")
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(f"cuda:{i} {props.name} {props.total_memory / 2**30:.1f} GiB")
    return Finding("OK", "gpu", ", ".join(gpus))


def resolve_accelerate_config(flag: str | None) -> tuple[Path | None, str]:
    """The launch config a launch would use: --accelerate_config, else $ACCELERATE_CONFIG (the Slurm scripts'
    setting), else accelerate's default config file (`accelerate config`) if there is one."""
    if flag:
        if not Path(flag).is_file():
            raise UserError(f"--accelerate_config {flag}: file not found")
        return Path(flag), "--accelerate_config"
    if os.environ.get("ACCELERATE_CONFIG"):
        return Path(os.environ["ACCELERATE_CONFIG"]), "$ACCELERATE_CONFIG"
    from accelerate.commands.config.config_args import default_config_file

    if Path(default_config_file).is_file():
        return Path(default_config_file), "accelerate's default config"
    return None, "no launch config given and no accelerate default config"


def _distribution(cc, cuda: bool) -> Finding:
    """Is the launch really one distributed job on this hardware?"""
    kind = getattr(cc.distributed_type, "value", str(cc.distributed_type))
    n, machines = int(cc.num_processes or 1), int(cc.num_machines or 1)
    per_machine = max(1, n // machines)
    if kind == "NO":
        if n > 1:
            return Finding("WARN", "launch", f"num_processes {n} with distributed_type NO: one process runs")
        unused = ", use_cpu: true leaves the GPU unused" if cuda and cc.use_cpu else ""
        return Finding("OK", "launch", f"not distributed: 1 process{unused}")
    if kind == "FSDP" and not cuda:
        return Finding("FAIL", "launch", "FSDP without a GPU: FSDP on CPU does not start")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        return Finding("FAIL", "launch", "distributed_type DEEPSPEED but deepspeed is not installed")
    from resumable.backend import env_flag

    if kind == "DEEPSPEED" and (cc.use_cpu or env_flag("ACCELERATE_USE_CPU")):
        return Finding("FAIL", "launch", "DEEPSPEED with use_cpu / ACCELERATE_USE_CPU: accelerate runs plain DDP")
    if kind == "DEEPSPEED" and not cuda:  # train.py joins the processes over gloo (backend.py)
        stage = (cc.deepspeed_config or {}).get("zero_stage")
        return Finding("OK", "launch", f"really distributed: DeepSpeed ZeRO-{stage}, {n} CPU processes over gloo")
    if kind in ("MULTI_GPU", "DEEPSPEED", "FSDP") and cuda and not cc.use_cpu:
        import torch

        gpus = torch.cuda.device_count()
        if per_machine > gpus:
            return Finding("FAIL", "launch", f"{kind}: {per_machine} processes per machine but {gpus} GPU(s) here")
        if n == 1:
            return Finding("WARN", "launch", f"{kind} with num_processes 1: not distributed")
        return Finding("OK", "launch", f"really distributed: {kind}, {n} processes on {machines} machine(s), NCCL")
    if kind in ("MULTI_GPU", "MULTI_CPU"):  # without a GPU, train.py joins the processes over gloo (launch.py)
        if n == 1:
            return Finding("WARN", "launch", f"{kind} with num_processes 1: not distributed")
        return Finding("OK", "launch", f"really distributed: {n} CPU processes on {machines} machine(s), DDP over gloo")
    return Finding("WARN", "launch", f"distributed_type {kind}: not checked here")


def _bf16_on_gpu() -> bool:
    import torch

    try:  # without emulation: torch reports bf16 "supported" on a T4 by emulating it, slowly
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def _precision(cfg: TrainConfig, cc, cuda: bool) -> Finding:
    precision = cfg.mixed_precision or (cc.mixed_precision if cc is not None else None) or "no"
    source = "--mixed_precision" if cfg.mixed_precision else "launch config" if cc is not None else "default"
    on_gpu = cuda and not (cc is not None and cc.use_cpu)
    if precision == "no":
        return Finding("OK", "precision", f"fp32 ({source})")
    if precision == "fp16":
        if on_gpu:
            return Finding("OK", "precision", f"fp16 on {_gpu_name()} ({source})")
        where = "use_cpu: true in the launch config" if cuda else "no CUDA GPU here"
        return Finding(
            "FAIL", "precision", f"fp16 ({source}) needs a CUDA GPU, {where}: set mixed_precision bf16 or no"
        )
    if precision == "bf16":
        if not on_gpu:
            return Finding("OK", "precision", f"bf16 on CPU ({source})")
        if _bf16_on_gpu():
            return Finding("OK", "precision", f"bf16 on {_gpu_name()} ({source})")
        return Finding(
            "FAIL", "precision", f"bf16 ({source}) is not supported by {_gpu_name()} (a T4 cannot): use fp16"
        )
    return Finding("WARN", "precision", f"{precision} ({source}): not checked here")


def check_accelerate_config(cfg: TrainConfig, path: Path | None, source: str = "") -> list[Finding]:
    """The launch config loaded with accelerate's own loader: distribution and precision on this hardware."""
    import torch

    cuda = torch.cuda.is_available()
    cc = None
    if path is None:
        findings = [Finding("OK", "launch", f"{source}: one process")]
    else:
        if not path.is_file():
            return [Finding("FAIL", "launch", f"{path} ({source}): file not found")]
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            cc = load_config_from_file(str(path))
        except Exception as err:  # YAML errors, unknown keys (TypeError), bad enum values
            return [Finding("FAIL", "launch", f"{path}: accelerate cannot load it ({_first_line(err)})")]
        found = _distribution(cc, cuda)
        findings = [Finding(found.level, found.check, f"{path} ({source}): {found.message}")]
    return [*findings, _precision(cfg, cc, cuda)]


# --- the report


def run_preflight(
    cfg: TrainConfig, accelerate_config: str | None = None, slurm_signal_lead: int | None = None
) -> Iterator[Finding]:
    """Every check, cheapest first, yielded as it is done (a person watches them come)."""
    yield from check_versions()
    yield check_gpu()
    path, source = resolve_accelerate_config(accelerate_config)
    yield from check_accelerate_config(cfg, path, source)
    try:
        parameters = count_parameters(cfg)
    except UserError as err:  # an unknown --model_type, bad --config_overrides: the run would stop there too
        yield Finding("FAIL", "model", str(err))
        parameters = None
    size = None if parameters is None else estimate_checkpoint_bytes(cfg, *parameters)
    yield from check_disk(cfg, size)
    yield from check_data(cfg)
    yield from check_model(cfg, parameters)
    yield from check_slurm(cfg, slurm_signal_lead, size)


def report(findings: list[Finding]) -> tuple[str, int]:
    """The closing line and the exit code: 0 ready (warnings allowed), 1 if anything is a blocker."""
    fails = sum(f.level == "FAIL" for f in findings)
    warns = sum(f.level == "WARN" for f in findings)
    if fails:
        return f"NOT READY: {fails} blocker(s), {warns} warning(s)", 1
    return f"READY: {len(findings)} checks, {warns} warning(s)", 0

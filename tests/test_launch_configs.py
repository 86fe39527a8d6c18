"""Launch configs: every one loads with accelerate's own loader, says what it is for, and the presets name real ones."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from conftest import REPO

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
NAMED = re.compile(r"accelerate_configs/([\w.-]+\.yaml)")


def test_every_launch_config_the_mission_names_is_shipped():
    names = {p.name for p in CONFIGS}
    assert {"cpu.yaml", "cpu_ddp.yaml", "t4.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
            "deepspeed_zero3_offload.yaml", "fsdp.yaml", "tpu.yaml", "multi_node.yaml"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_launch_config_loads_with_accelerates_loader_and_starts_with_what_it_is_for(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    assert path.read_text().startswith("# "), "the first line says what the config is for"
    if config.distributed_type == DistributedType.DEEPSPEED:  # train.py owns accumulation: DeepSpeed's must be 1
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
        assert not config.use_cpu, "use_cpu makes accelerate drop DeepSpeed for plain DDP"
        if config.deepspeed_config["zero_stage"] == 3:
            assert config.deepspeed_config["zero3_save_16bit_model"], "final/ needs the gathered weights"


def test_fsdp_config_shards_the_state_dict_and_multi_node_spans_two_machines():
    fsdp = load_config_from_file(str(REPO / "accelerate_configs" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    multi = load_config_from_file(str(REPO / "accelerate_configs" / "multi_node.yaml"))
    assert multi.num_machines == 2 and multi.num_processes == 8
    assert "accelerate_configs/multi_node.yaml" in (REPO / "scripts" / "slurm" / "train_multinode.sbatch").read_text()
    assert load_config_from_file(str(REPO / "accelerate_configs" / "tpu.yaml")).distributed_type == DistributedType.XLA


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_each_preset_names_launch_configs_that_exist(preset):
    named = NAMED.findall(preset.read_text())
    assert named, f"{preset.name} says which launch config to use"
    for name in named:
        assert (REPO / "accelerate_configs" / name).is_file(), f"{preset.name} names a missing {name}"


def _cfg(tmp_path, *extra: str):
    from conftest import TINY_LM

    from resumable.config import parse_config

    return parse_config([*TINY_LM, "--output_dir", str(tmp_path / "out"), *extra])


def test_backend_preparation_refuses_what_cannot_work_in_one_line(tmp_path, monkeypatch):
    import torch

    from resumable.backend import prepare_backend
    from resumable.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="FSDP launch config needs GPUs"):
        prepare_backend(_cfg(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    (handler,) = prepare_backend(_cfg(tmp_path, "--ddp_timeout", "77"))["kwargs_handlers"]
    assert handler.to_kwargs() == {"timeout": timedelta(seconds=77)}  # DDP / one process: only --ddp_timeout
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    (handler,) = prepare_backend(_cfg(tmp_path))["kwargs_handlers"]
    assert handler.backend == "gloo"  # DeepSpeed's own default on CPU would be oneCCL
    assert handler.timeout == timedelta(seconds=1800)  # HF Trainer's default, not NCCL's 600 s
    with pytest.raises(UserError, match="--nan_policy skip_step is not supported under DeepSpeed"):
        prepare_backend(_cfg(tmp_path, "--nan_policy", "skip_step"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(UserError, match="would silently train plain DDP"):
        prepare_backend(_cfg(tmp_path))


@pytest.mark.slow
def test_an_fsdp_launch_without_gpus_stops_with_one_line(tmp_path, cache_dir):
    from conftest import TINY_LM, Run

    result = Run(TINY_LM, tmp_path / "run", cache_dir, "fsdp", launch_args=("--num_processes", "2")).run()
    assert result.returncode != 0
    assert "error: an FSDP launch config needs GPUs and none is visible" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

"""ParallelDims / pipeline layout validation, env parsing, and the one-process parallelize path.

All single-process: these run in well under a second each.
"""

import os
import subprocess
import sys

import pytest
import torch

from megatrain.errors import ConfigError
from megatrain.parallel import ParallelConfig, ParallelDims, dist_env, parallelize_mtp
from megatrain.parallel.pipeline_layout import balanced_stage_layers, check_pipeline_layout, local_stage_ids
from megatrain.parallel.process_group import DistEnv
from tests.parallel_harness import BATCH, assert_matches, build_model, reference_run, tiny_cfg, train_parallel


def test_degrees_must_multiply_to_world_size_and_message_names_keys():
    with pytest.raises(ConfigError, match=r"parallel.dp \* parallel.tp \* parallel.pp = 2 \* 2 \* 1 = 4"
                                          r".*3 processes"):
        ParallelDims(dp=2, tp=2, pp=1, world_size=3)
    with pytest.raises(ConfigError, match="parallel.pp=0 must be >= 1"):
        ParallelDims(dp=1, tp=1, pp=0, world_size=1)


@pytest.mark.parametrize("key, overrides", [("model.n_heads", dict(n_heads=3, n_kv_heads=3, dim=48)),
                                            ("model.n_kv_heads", dict(n_kv_heads=1)),
                                            ("model.vocab_size", dict(vocab_size=97))])
def test_tp_must_divide_heads_and_vocab(key, overrides):
    with pytest.raises(ConfigError, match=f"parallel.tp=2 must divide {key}"):
        ParallelDims(dp=1, tp=2, pp=1, world_size=2).validate(tiny_cfg(**overrides))


def test_unsupported_combinations_are_config_errors():
    dims = ParallelDims(dp=2, tp=2, pp=1, world_size=4)
    with pytest.raises(ConfigError, match="dp_engine=deepspeed supports data parallelism only"):
        dims.validate(tiny_cfg(), ParallelConfig(dp=2, tp=2, dp_engine="deepspeed"))
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tp > 1"):
        ParallelDims(1, 1, 1, 1).validate(tiny_cfg(), ParallelConfig(sequence_parallel=True))
    with pytest.raises(ConfigError, match="train.batch_size=3 must be a multiple of parallel.dp=2"):
        dims.validate(tiny_cfg(), batch_size=3)


def test_pipeline_needs_enough_trunk_layers_for_its_stages():
    # n_layers=6, n_future=4: 2 trunk layers; zbv on pp=2 makes 4 stages, 3 of which need a layer
    with pytest.raises(ConfigError, match=r"4 pipeline stages, but the model has only 2 trunk layers.*"
                                          r"model.n_layers to >= 7"):
        check_pipeline_layout(tiny_cfg(), 2, ParallelConfig(pp=2, pp_schedule="zbv", microbatches=4))


def test_zero_bubble_schedules_are_refused_on_a_torch_that_cannot_run_them(monkeypatch):
    cfg, layout = tiny_cfg(n_layers=8), dict(pp=2, microbatches=4)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # the lent GPU machines' torch
    for schedule in ("zbv", "dualpipev"):
        with pytest.raises(ConfigError, match=f"pp_schedule={schedule} needs torch >= 2.12 .*torch "
                                              f"2.11.0.*use parallel.pp_schedule=1f1b"):
            check_pipeline_layout(cfg, 2, ParallelConfig(pp_schedule=schedule, **layout))
    check_pipeline_layout(cfg, 2, ParallelConfig(pp_schedule="1f1b", **layout))  # the others run
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    check_pipeline_layout(cfg, 2, ParallelConfig(pp_schedule="zbv", **layout))


@pytest.mark.parametrize("schedule, micro, need", [("1f1b", 1, 2), ("interleaved_1f1b", 1, 2),
                                                   ("zbv", 2, 4), ("dualpipev", 3, 4)])
def test_pipeline_rejects_too_few_microbatches(schedule, micro, need):
    cfg = tiny_cfg(n_layers=8)
    with pytest.raises(ConfigError, match=f"needs at least {need} microbatches, got {micro}; set "
                                          f"parallel.microbatches >= {need}"):
        check_pipeline_layout(cfg, 2, ParallelConfig(pp=2, pp_schedule=schedule, microbatches=micro))


def test_interleaved_microbatches_must_be_a_multiple_of_pp_and_divide_batch():
    cfg = tiny_cfg(n_layers=8)
    with pytest.raises(ConfigError, match="multiple of parallel.pp=2, got 3"):
        check_pipeline_layout(cfg, 2, ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", microbatches=3))
    with pytest.raises(ConfigError, match="4 pipeline microbatches must divide the per-rank batch 6"):
        check_pipeline_layout(cfg, 2, ParallelConfig(pp=2, microbatches=4), local_batch=6)


def test_balanced_assignment_puts_fewer_trunk_layers_on_the_heads_stage():
    cfg = tiny_cfg(n_layers=12, n_future=4, vocab_size=96)  # 8 trunk layers; heads cost ~4 x 1.4 layers
    layers = balanced_stage_layers(cfg, 2)
    assert sum(layers) == 8 and layers[0] > layers[1], layers
    big_vocab = balanced_stage_layers(tiny_cfg(n_layers=12, vocab_size=4096), 4)
    assert big_vocab[-1] == 0 and min(big_vocab[:-1]) >= 1, big_vocab  # heads alone fill the last stage
    assert balanced_stage_layers(tiny_cfg(n_layers=8, n_future=1), 2) == [4, 3]  # 7 trunk + 1 head


def test_explicit_stage_layers_override_and_are_checked():
    cfg = tiny_cfg(n_layers=8)  # 4 trunk layers
    assert check_pipeline_layout(cfg, 2, ParallelConfig(pp=2, stage_layers=[1, 3], microbatches=2)) == [1, 3]
    with pytest.raises(ConfigError, match=r"parallel.stage_layers=\[2, 1\] must list 2 stages.*sum to 4"):
        check_pipeline_layout(cfg, 2, ParallelConfig(pp=2, stage_layers=[2, 1], microbatches=2))


def test_stage_placement_looped_and_v_shaped():
    assert local_stage_ids(1, 2, "interleaved_1f1b", 2) == [1, 3]
    assert local_stage_ids(0, 2, "zbv", 2) == [0, 3]  # rank 0 holds the first and the last stage
    assert local_stage_ids(1, 4, "1f1b", 2) == [1]


def test_dist_env_reads_torchrun_then_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert dist_env() == DistEnv(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert (dist_env().rank, dist_env().world_size, dist_env().local_rank) == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert (dist_env().rank, dist_env().world_size, dist_env().local_rank) == (2, 4, 2)


def test_init_distributed_from_slurm_env_single_task():
    code = ("import torch.distributed as dist; from megatrain.parallel import init_distributed; "
            "e = init_distributed(); print(dist.get_backend(), dist.get_world_size(), e.rank)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", MASTER_PORT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["gloo", "1", "0"], out.stderr[-2000:]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_single_process_parallelize_with_activation_checkpointing_matches_trainer(mode):
    """pp=tp=dp=1 goes through the same MTPStage runtime (and AC) and must equal the trainer."""
    cfg = tiny_cfg(n_layers=7)
    reference = reference_run(cfg, steps=3)
    pm = parallelize_mtp(build_model(cfg), ParallelDims(1, 1, 1, 1), None,
                         ParallelConfig(activation_checkpointing=mode), local_batch=BATCH, impl="torch")
    assert_matches(reference, train_parallel(pm, cfg, steps=3))

"""init.path (the issue's init.from): a fresh run from a run dir, a checkpoint folder or an export,
with the same, fewer (n'=1) or more heads than the source.

What is protected: an n=4 run's trunk + head 1 become an n'=1 model's weights exactly (through the
trainer, with a fresh optimizer); an n=2 export grows to n=4 with the new heads at the model's own
initial values; a differing width or trunk depth is refused naming the key and the value that
fits. The negative control shows the weight comparison catches a wrong head.
"""

import dataclasses

import pytest
import torch

from megatrain.config import ModelConfig, load_config
from megatrain.errors import CheckpointError, ConfigError
from megatrain.inference.init_from import read_init_weights
from megatrain.inference.load import load_model
from megatrain.inference.meta_format import write_meta
from megatrain.model.mtp import MTPTransformer
from tests.parallel_harness import full_params
from tests.test_trainer import _overrides


def _mismatches(new: dict, source: dict, pairs: dict) -> list[str]:
    """Names of ``new`` whose tensor differs from ``source[pairs[name]]``."""
    return [name for name, src in pairs.items() if not torch.equal(new[name].float(), source[src].float())]


@pytest.fixture(scope="module")
def n4_run(dataset, tmp_path_factory):
    """An n_future=4 run (trunk of 2 layers, 2 steps) with one checkpoint."""
    from megatrain.trainer import train

    run = tmp_path_factory.mktemp("n4") / "run"
    train(load_config(None, _overrides(dataset, run, **{"model.n_layers": 6, "model.n_future": 4,
                                                        "train.steps": 2, "checkpoint.every": 0,
                                                        "train.eval_every": 0})))
    return run


def _setup_params(dataset, run_dir, **extra):
    """The step-0 weights and optimizer of a run set up by the trainer."""
    from megatrain.trainer import setup

    run = setup(load_config(None, _overrides(dataset, run_dir, **{"train.eval_every": 0, **extra})))
    try:
        return full_params(run.engine.stages[0].named_parameters()), run.engine.optimizers[0].state
    finally:
        run.logger.close()
        run.lock.release()


def test_n1_finetune_starts_from_trunk_and_head1_exactly(dataset, n4_run, tmp_path):
    source = load_model(n4_run)[0].state_dict()
    params, optimizer_state = _setup_params(dataset, tmp_path / "ft", **{
        "model.n_layers": 3, "model.n_future": 1, "init.path": str(n4_run)})
    # n'=1 keeps every name: layers.2 is head 1 on both sides (the last entry of `layers`)
    assert sorted(params) == sorted(n for n in source if not n.startswith("extra_heads."))
    assert _mismatches(params, source, {n: n for n in params}) == []
    assert not optimizer_state  # fresh: no moments, no step count
    # negative control: the same comparison against head 2 as "head 1", and a random start
    wrong_head = {n: n.replace("layers.2.", "extra_heads.0.") for n in params if n.startswith("layers.2.")}
    assert len(_mismatches(params, source, wrong_head)) == len(wrong_head)
    random_start, _ = _setup_params(dataset, tmp_path / "scratch", **{"model.n_layers": 3,
                                                                      "model.n_future": 1})
    assert _mismatches(random_start, source, {n: n for n in random_start})


@pytest.mark.distributed
@pytest.mark.slow
def test_dp2_n1_finetune_reads_the_run_dir_on_every_rank(dataset, n4_run, tmp_path):
    """Each FSDP rank reads the checkpoint tensors it needs on its own (no collective)."""
    from tests.parallel_harness import run_ranks
    from tests.test_export import _start_weights

    source = load_model(n4_run)[0].state_dict()
    overrides = _overrides(dataset, tmp_path / "ft", **{
        "model.n_layers": 3, "model.n_future": 1, "init.path": str(n4_run), "train.eval_every": 0,
        "parallel.dp": 2})
    for params in run_ranks(2, _start_weights, overrides):
        assert params and _mismatches(params, source, {n: n for n in params}) == []


def test_checkpoint_folder_is_a_source_too(n4_run):
    step_folder = next((n4_run / "checkpoints").glob("step_*"))
    model, cfg = load_model(n4_run)
    weights, source = read_init_weights(str(step_folder), cfg.model), model.state_dict()
    assert set(weights) == set(source)
    assert _mismatches(dict(weights), source, {n: n for n in source}) == []


def test_n2_export_grows_to_n4_with_freshly_initialised_heads(tmp_path, tiny_model_cfg):
    small = tiny_model_cfg(n_layers=4, n_future=2)  # trunk of 2 layers
    model = MTPTransformer(small, 16, seed=5)
    with torch.no_grad():  # far from any init, so a copy cannot be confused with a fresh value
        for p in model.parameters():
            p.add_(1.0)
    write_meta(model.state_dict(), small, tmp_path)
    bigger = dataclasses.replace(small, n_layers=6, n_future=4)  # same trunk, two more heads
    weights = dict(read_init_weights(str(tmp_path), bigger, seed=7))
    source, fresh = model.state_dict(), MTPTransformer(bigger, 16, seed=7).state_dict()
    assert set(weights) == set(fresh)
    new_heads = {n for n in weights if n.startswith(("extra_heads.1.", "extra_heads.2."))}
    assert new_heads and _mismatches(weights, source, {n: n for n in weights if n not in new_heads}) == []
    assert _mismatches(weights, fresh, {n: n for n in new_heads}) == []
    # negative control: the copied head 2 is not a fresh value
    assert _mismatches(weights, fresh, {n: n for n in weights if n.startswith("extra_heads.0.")})


@pytest.mark.parametrize("change, message", [
    (dict(dim=64), "model.dim=64 does not match .* set model.dim=32"),
    (dict(n_kv_heads=4), "model.n_kv_heads=4 .* set model.n_kv_heads=2"),
    (dict(n_future=1), "trunk of 5 layers, but .* has 2 .* set model.n_layers=3 "),
    (dict(n_layers=8), "trunk of 4 layers, .* set model.n_layers=6 "),
    (dict(multiple_of=64), "set model.multiple_of=16"),
    (dict(head_type="linear"), "model.head_type=linear cannot start from"),
])
def test_a_model_of_another_shape_is_refused_by_key(tmp_path, tiny_model_cfg, change, message):
    source = tiny_model_cfg(n_layers=6, n_future=4)
    write_meta(MTPTransformer(source, 16).state_dict(), source, tmp_path)
    read_init_weights(str(tmp_path), source)  # control: the source's own shape is accepted
    with pytest.raises(ConfigError, match=message):
        read_init_weights(str(tmp_path), dataclasses.replace(source, **change))


def test_a_folder_that_is_no_source_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a Meta-format folder.*nor a run directory"):
        read_init_weights(str(tmp_path), ModelConfig(vocab_size=64))


def test_init_from_is_an_override_alias_of_init_path():
    assert load_config(None, ["init.from=/some/run"]).init.path == "/some/run"
    assert load_config(None, []).init.path == ""  # control: not set unless given

"""``resolve(cfg) -> RunSpec``: every derived fact once, the caller's config untouched, and the
layout validated before anything runs; ``RunDir``: the one owner of a run directory's names."""

import copy
from pathlib import Path

import pytest

from megatrain.config import load_config
from megatrain.errors import ConfigError, DataError
from megatrain.run_dir import RunDir
from megatrain.spec import padded_vocab, resolve, with_absolute_paths


def test_resolve_fills_the_derived_facts_and_leaves_the_callers_config_alone(dataset, tmp_path):
    cfg = load_config(None, [f"data.path={dataset}", f"run.dir={tmp_path / 'run'}", "train.batch_size=8",
                             "train.micro_batch_size=2", "parallel.dp=2", "loss.extra_heads_weight=0.5"])
    before = copy.deepcopy(cfg)
    spec = resolve(cfg)
    assert cfg == before  # nothing mutated
    assert spec.config.model.vocab_size == spec.vocab_size == padded_vocab(257) == 320  # bytes + EOS
    assert spec.dataset_dir == Path(dataset).absolute() and spec.run_dir.path == tmp_path / "run"
    assert (spec.world_size, spec.local_batch, spec.micro_batch, spec.forwards_per_step) == (2, 4, 2, 2)
    assert spec.max_seq_len == cfg.data.seq_len
    assert spec.head_weights == (1.0, 0.5, 0.5, 0.5)
    assert spec.notes == ()


def test_pipeline_layout_and_microbatches_are_resolved_once(dataset, tmp_path):
    cfg = load_config(None, [f"data.path={dataset}", f"run.dir={tmp_path}", "model.n_layers=8",
                             "train.batch_size=8", "parallel.pp=2", "parallel.microbatches=4"])
    spec = resolve(cfg)
    assert spec.stage_layers and sum(spec.stage_layers) == 8 - 4  # the trunk, split over 2 stages
    assert (spec.pipeline_microbatches, spec.micro_batch, spec.forwards_per_step) == (4, 2, 4)


def test_a_layout_that_does_not_fit_the_processes_is_refused_naming_the_keys(dataset, tmp_path):
    cfg = load_config(None, [f"data.path={dataset}", f"run.dir={tmp_path}", "parallel.dp=2"])
    with pytest.raises(ConfigError, match="parallel.dp \\* parallel.tp \\* parallel.pp = 2 \\* 1 \\* 1"):
        resolve(cfg, world_size=4)
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer's 257"):
        resolve(load_config(None, [f"data.path={dataset}", "model.vocab_size=100"]))


def test_every_path_is_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    """A SLURM job starts in another directory: a relative data.mixture path, init.path or
    data.cache_dir would otherwise resolve somewhere else there."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.dir=runs/a", "data.mixture=[{path: data/x, weight: 1}]",
                             "init.path=runs/base", "data.cache_dir=cache"])
    out = with_absolute_paths(cfg)
    assert out.run.dir == str(tmp_path / "runs/a")
    assert out.data.mixture[0].path == str(tmp_path / "data/x")
    assert out.init.path == str(tmp_path / "runs/base") and out.data.cache_dir == str(tmp_path / "cache")
    assert out.data.path == "" and cfg.run.dir == "runs/a"  # empty stays empty; the input unchanged


def test_data_modes_build_peek_or_read_nothing(tmp_path):
    cache = tmp_path / "cache"
    plain = load_config(None, [f"data.cache_dir={cache}", f"run.dir={tmp_path / 'r'}"])
    peeked = resolve(plain, data="existing")  # the embedded corpus, not built: its definition's size
    assert peeked.vocab_size == 4096 and not cache.exists()
    with pytest.raises(ConfigError, match="model.vocab_size=0 means 'the dataset's'.*set model.vocab_size"):
        resolve(plain, data="none")
    given = resolve(load_config(None, ["model.vocab_size=512"]), data="none")
    assert given.vocab_size == 512 and given.dataset_dir is None
    with pytest.raises(DataError, match="is not a prepared dataset"):
        resolve(load_config(None, [f"data.path={tmp_path / 'missing'}"]), data="existing")
    # a plan for a cluster whose data this host lacks: the vocabulary given stands
    elsewhere = resolve(load_config(None, [f"data.path={tmp_path / 'missing'}", "model.vocab_size=512"]),
                        data="existing")
    assert elsewhere.vocab_size == 512
    # the embedded corpus's tokenizer is known unbuilt: the same refusal train would give
    with pytest.raises(ConfigError, match="vocab_size=512 is smaller than the tokenizer's 4096 "
                                          "\\(the embedded default corpus\\)"):
        resolve(load_config(None, [f"data.cache_dir={cache}", "model.vocab_size=512"]), data="existing")


def test_a_run_started_before_extra_heads_weight_keeps_its_unweighted_sum(dataset, tmp_path):
    run_dir = RunDir(tmp_path)
    old = load_config(None, [f"data.path={dataset}"])
    run_dir.write_config(old)
    text = run_dir.config_path.read_text().replace("  extra_heads_weight: 0.03\n", "")
    run_dir.config_path.write_text(text)  # as an older megatrain wrote it
    spec = resolve(load_config(None, [f"data.path={dataset}", f"run.dir={tmp_path}"]))
    assert spec.head_weights == (1.0, 1.0, 1.0, 1.0) and "summed unweighted" in spec.notes[0]
    asked = resolve(load_config(None, [f"data.path={dataset}", f"run.dir={tmp_path}",
                                       "loss.extra_heads_weight=0.1"]))
    assert asked.head_weights == (1.0, 0.1, 0.1, 0.1) and asked.notes == ()


def test_run_dir_names_every_file_and_reads_its_checkpoints(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.config_path == tmp_path / "config.yaml"
    assert run_dir.metrics_path == tmp_path / "metrics.jsonl"
    assert run_dir.checkpoint_path(50) == tmp_path / "checkpoints" / "step_0000050"
    assert run_dir.latest_path == tmp_path / "checkpoints" / "latest"
    assert not run_dir.has_history() and run_dir.latest_name() is None
    for step in (100, 50):
        run_dir.checkpoint_path(step).mkdir(parents=True)
    (run_dir.checkpoints_dir / "step_0000150.tmp").mkdir()  # a partial save is not a checkpoint
    (run_dir.checkpoints_dir / "notes").mkdir()
    assert run_dir.checkpoint_steps() == [50, 100] and run_dir.has_history()
    assert RunDir.step_of(run_dir.checkpoint_path(100)) == 100 and RunDir.step_of(Path("x")) is None


def test_a_config_whose_vocabulary_a_start_resolved_records_no_change(tmp_path):
    """`submit` writes config.yaml with model.vocab_size=0 (the dataset's); the job's first start
    fills it in, which is not a change of the config."""
    run_dir = RunDir(tmp_path)
    run_dir.write_config(load_config(None, []))
    assert run_dir.record_config(load_config(None, ["model.vocab_size=4096"]), 0) == {}
    changes = run_dir.record_config(load_config(None, ["model.vocab_size=4096", "train.lr=0.001"]), 10)
    assert changes == {"train.lr": [0.003, 0.001]}
    assert run_dir.history_path.read_text().count("\n") == 1


def test_mtp_lambda_schedule_switches_the_depths_weight_at_its_step():
    from megatrain.config import head_loss_weights

    cfg = load_config(None, ["model.mtp_kind=sequential", "model.n_future=3", "loss.mtp_lambda=0.3",
                             "loss.mtp_lambda_after=0.1", "loss.mtp_lambda_step=10"])
    assert head_loss_weights(cfg, 9) == [1.0, 0.15, 0.15]  # lambda / D each
    assert head_loss_weights(cfg, 10) == [1.0, 0.05, 0.05]
    never = load_config(None, ["model.mtp_kind=sequential", "model.n_future=3"])
    assert head_loss_weights(never, 10**6) == [1.0, 0.15, 0.15]
    parallel = load_config(None, ["model.n_future=3", "loss.mtp_lambda_step=10"])  # not for parallel heads
    assert head_loss_weights(parallel, 10) == [1.0, 0.03, 0.03]

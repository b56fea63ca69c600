"""Config merging and validation: every bad input names its key."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatrain.cli import main
from megatrain.config import Config, load_config, reference_markdown
from megatrain.errors import ConfigError

REPO = Path(__file__).parent.parent


def test_defaults_are_the_embedded_tiny_run():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.n_future == 4 and cfg.model.n_layers > cfg.model.n_future
    assert (cfg.run.overwrite, cfg.checkpoint.load_step) == ("refuse", 0)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_future: 2\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "run.dir=/tmp/x"])
    assert (cfg.model.n_future, cfg.train.steps, cfg.run.dir) == (2, 9, "/tmp/x")


@pytest.mark.parametrize("overrides, fragment", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["nosuch.key=3"], "unknown config key 'nosuch'"),
    (["train.steps=many"], "train.steps"),
    (["train.steps"], "key=value"),
    (["train.lr=[1"], "train.lr=[1"),  # unparsable value
    # model
    (["model.n_layers=0"], "model.n_layers"),
    (["model.n_future=0"], "model.n_future"),
    (["model.n_future=6", "model.n_layers=6"], "model.n_layers"),
    (["model.dim=0"], "model.dim"),
    (["model.n_heads=0"], "model.n_heads"),
    (["model.n_heads=-4"], "model.n_heads"),
    (["model.n_kv_heads=0"], "model.n_kv_heads"),
    (["model.n_kv_heads=-2"], "model.n_kv_heads"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.vocab_size=-1"], "model.vocab_size"),
    (["model.ffn_dim_multiplier=0"], "model.ffn_dim_multiplier"),
    (["model.ffn_dim_multiplier=-1.5"], "model.ffn_dim_multiplier"),
    (["model.multiple_of=0"], "model.multiple_of"),
    (["model.norm_eps=0"], "model.norm_eps"),
    (["model.norm_eps=-1e-5"], "model.norm_eps"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.rope_theta=inf"], "model.rope_theta"),
    (["model.max_seq_len=64"], "model.max_seq_len"),  # below data.seq_len=128
    (["model.max_seq_len=-1"], "model.max_seq_len"),
    (["model.init_std=0"], "model.init_std"),
    (["model.init_std=nan"], "model.init_std"),
    (["model.head_type=diagonal"], "model.head_type"),
    (["model.dim=100", "model.n_heads=3"], "model.dim"),
    # loss
    (["loss.head_weights=[1,2]"], "loss.head_weights"),
    (["loss.head_weights=[1,-1,1,1]"], "loss.head_weights"),
    (["loss.head_weights=[0,0,0,0]"], "loss.head_weights"),
    (["loss.head_weights=[1,nan,1,1]"], "loss.head_weights"),
    (["loss.extra_heads_weight=-0.1"], "loss.extra_heads_weight"),
    (["loss.extra_heads_weight=inf"], "loss.extra_heads_weight"),
    # data
    (["data.seq_len=4"], "data.seq_len"),
    (["data.val_batches=-1"], "data.val_batches"),
    # train
    (["train.steps=-1"], "train.steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.micro_batch_size=-1"], "train.micro_batch_size"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.micro_batch_size"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.lr=inf"], "train.lr"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.beta1=2"], "train.beta1"),
    (["train.beta1=1"], "train.beta1"),
    (["train.beta1=-0.1"], "train.beta1"),
    (["train.beta2=1.0"], "train.beta2"),
    (["train.beta2=-0.5"], "train.beta2"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.seed=-1"], "train.seed"),
    (["train.eval_every=-1"], "train.eval_every"),
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    (["train.threads=-1"], "train.threads"),
    (["train.compile=true", "parallel.sequence_parallel=true"], "train.compile"),
    # checkpoint, logging, run
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["checkpoint.load_step=-1"], "checkpoint.load_step"),
    (["logging.every=0"], "logging.every"),
    (["logging.every=-5"], "logging.every"),
    (["run.dir="], "run.dir"),
    (["run.overwrite=delete"], "run.overwrite"),
    # parallel
    (["parallel.dp=0"], "parallel.dp"),
    (["parallel.tp=0"], "parallel.tp"),
    (["parallel.pp=-1"], "parallel.pp"),
    (["parallel.microbatches=-1"], "parallel.microbatches"),
    (["parallel.virtual_stages=0"], "parallel.virtual_stages"),
    (["parallel.zero_stage=0"], "parallel.zero_stage"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        load_config(None, overrides)
    assert "\n" not in str(caught.value), "the CLI prints the message as one line"


def test_range_message_names_value_range_and_fix():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.beta1=2"])
    message = str(caught.value)
    assert "train.beta1=2.0" in message and "[0, 1)" in message and "default 0.9" in message, message
    with pytest.raises(ConfigError, match=r"model.max_seq_len=64 is below data.seq_len=128.*or 0"):
        load_config(None, ["model.max_seq_len=64"])


@pytest.mark.parametrize("overrides", [
    ["model.max_seq_len=0"],  # 0 = data.seq_len
    ["model.max_seq_len=128"],  # exactly data.seq_len
    ["model.n_kv_heads=null", "model.ffn_dim_multiplier=null"],
    ["model.ffn_dim_multiplier=1.3", "model.n_kv_heads=2"],
    ["train.beta1=0", "train.beta2=0.999", "train.min_lr_ratio=1", "train.min_lr_ratio=0"],
    ["train.grad_clip=0", "train.weight_decay=0", "train.threads=0", "train.eval_every=0"],
    ["checkpoint.every=0", "checkpoint.load_step=5", "data.val_batches=0"],
    ["run.overwrite=archive", "parallel.zero_stage=1", "loss.head_weights=[1,0,0,0]"],
])
def test_values_at_the_edge_of_their_range_load(overrides):
    load_config(None, overrides)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_futur: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.n_futur"):
        load_config(path)


# (file content, what the message must say); each once raised a raw traceback
BROKEN_YAML = {
    "malformed": (b"model: [1, 2\ntrain:\n  steps: 3\n", r"not valid YAML: .* at line \d+, column \d+"),
    "list": (b"- model\n- train\n", "holds a list at the top level"),
    "scalar": (b"42\n", "holds the single value '42' at the top level"),
    "binary": (bytes(range(256)), r"is not UTF-8 text \(byte 0x80 at offset 128\)"),
    "section_not_a_mapping": (b"model: 3\n", "section 'model' holds the single value '3'"),
    "duplicate_key": (b"train:\n  steps: 1\ntrain:\n  steps: 2\n", "duplicate key train"),
}


@pytest.mark.parametrize("kind", BROKEN_YAML)
def test_broken_yaml_is_one_line_naming_the_file(tmp_path, kind):
    content, fragment = BROKEN_YAML[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_empty_yaml_and_empty_section_keep_the_defaults(tmp_path):
    empty, section = tmp_path / "empty.yaml", tmp_path / "section.yaml"
    empty.write_text("# nothing yet\n")
    section.write_text("train:\n  # steps: 3\nmodel:\n  n_future: 2\n")  # every train key commented out
    assert load_config(empty) == load_config()
    default_steps = load_config().train.steps
    assert (load_config(section).train.steps, load_config(section).model.n_future) == (default_steps, 2)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


@pytest.mark.parametrize("kind", ["malformed", "list", "binary"])
def test_cli_prints_one_line_error_for_broken_yaml(tmp_path, capsys, kind):
    path = tmp_path / "bad.yaml"
    path.write_bytes(BROKEN_YAML[kind][0])
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatrain: error: ") and len(err.strip().splitlines()) == 1, err


def test_cli_process_exits_2_without_traceback(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)))
    proc = subprocess.run([sys.executable, "-m", "megatrain", "config", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatrain: error: config file "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_field_is_documented():
    table = reference_markdown()
    assert "`model.n_future`" in table and "`run.dir`" in table
    assert "`run.overwrite`" in table and "`checkpoint.load_step`" in table
    for row in table.splitlines()[2:]:
        key, _default, _valid, meaning = [cell.strip() for cell in row.strip("|").split(" | ")][:4]
        assert meaning, f"{key} has no doc"


def test_shipped_configs_load():
    configs = sorted(REPO.joinpath("configs").rglob("*.yaml"))
    assert len(configs) >= 13
    for path in configs:
        load_config(path)


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert section.strip() == reference_markdown().strip(), \
        "README config reference is stale: regenerate with `megatrain config --reference`"


def test_head_loss_weights_default_list_and_precedence():
    from megatrain.config import head_loss_weights

    assert head_loss_weights(load_config(None)) == [1.0, 0.03, 0.03, 0.03]  # the embedded default
    paper_sum = load_config(None, ["model.n_future=2", "loss.extra_heads_weight=1"])
    assert head_loss_weights(paper_sum) == [1.0, 1.0]
    assert head_loss_weights(load_config(None, ["model.n_future=1"])) == [1.0]
    # an explicit list wins over the scalar
    assert head_loss_weights(load_config(None, ["model.n_future=2", "loss.extra_heads_weight=0.5",
                                                "loss.head_weights=[1,2]"])) == [1.0, 2.0]


def test_a_saved_config_from_before_extra_heads_weight_reads_as_the_unweighted_sum(tmp_path):
    from megatrain.config import head_loss_weights, load_saved_config, to_yaml

    current = tmp_path / "current.yaml"
    current.write_text(to_yaml(load_config(None)))
    assert head_loss_weights(load_saved_config(current)) == [1.0, 0.03, 0.03, 0.03]  # control: as saved
    older = tmp_path / "older.yaml"
    older.write_text(current.read_text().replace("  extra_heads_weight: 0.03\n", ""))
    assert "extra_heads_weight" not in older.read_text()
    assert head_loss_weights(load_saved_config(older)) == [1.0, 1.0, 1.0, 1.0]


def test_every_choice_is_refused_by_name_when_loaded_and_when_built_in_code():
    """Choices are enum-typed: a loaded config names the key and the allowed values, and a Config
    built in code with a bad string is caught by validate, in the same one place."""
    import dataclasses

    from megatrain.config import Choice, Config, ParallelConfig, validate

    choices = [(section.name, f.name, f.default) for section in dataclasses.fields(Config)
               for f in dataclasses.fields(section.default_factory()) if isinstance(f.default, Choice)]
    assert len(choices) >= 11
    for section, name, default in choices:
        with pytest.raises(ConfigError, match=f"'{section}.{name}': Invalid value 'bogus', expected one "
                                              f"of \\[{type(default).values()[0]}"):
            load_config(None, [f"{section}.{name}=bogus"])
    cfg = load_config(None, ["parallel.pp_schedule=1f1b", "model.head_type=linear"])
    assert cfg.parallel.pp_schedule == "1f1b" and f"{cfg.model.head_type}" == "linear"  # strings
    with pytest.raises(ConfigError, match="parallel.pp_schedule='zigzag' is not one of gpipe, 1f1b"):
        validate(Config(parallel=ParallelConfig(pp_schedule="zigzag")))


@pytest.mark.parametrize("overrides, message", [
    (["model.mtp_kind=sequential", "model.head_type=causal"],
     "model.mtp_kind=sequential with model.head_type=causal.*leave model.head_type=transformer"),
    (["model.mtp_kind=sequential", "loss.mtp_lambda=-0.1"], "loss.mtp_lambda=-0.1 is out of range"),
    (["model.mtp_kind=sequential", "model.n_future=9", "data.seq_len=8"],
     "data.seq_len=8 must be larger than model.n_future=9"),
    (["model.mtp_kind=stacked"], "'model.mtp_kind': Invalid value 'stacked'"),
])
def test_sequential_mtp_bad_input_names_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sequential_modules_keep_the_full_trunk_and_add_parameters():
    """Unlike parallel heads (which replace n_future - 1 trunk layers), the depths come on top."""
    from megatrain.model.layout import LayerLayout

    parallel = LayerLayout.of(load_config(None, ["model.n_layers=6", "model.n_future=4"]).model)
    sequential = LayerLayout.of(load_config(None, ["model.n_layers=6", "model.n_future=4",
                                                   "model.mtp_kind=sequential"]).model)
    assert (parallel.n_trunk_layers, sequential.n_trunk_layers, sequential.n_depths) == (2, 6, 3)
    assert sequential.head_paths == ["mtp.0", "mtp.1", "mtp.2"] and sequential.head_path(0) is None

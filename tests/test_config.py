"""Config merging and validation: every bad input names its key."""

import pytest

from megatrain.config import Config, load_config, reference_markdown
from megatrain.errors import ConfigError


def test_defaults_are_the_embedded_tiny_run():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.n_future == 4 and cfg.model.n_layers > cfg.model.n_future


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
    (["model.n_future=0"], "model.n_future"),
    (["model.n_future=6", "model.n_layers=6"], "model.n_layers"),
    (["data.seq_len=4"], "data.seq_len"),
    (["model.head_type=diagonal"], "model.head_type"),
    (["model.dim=100", "model.n_heads=3"], "model.dim"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["loss.head_weights=[1,2]"], "loss.head_weights"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.micro_batch_size"),
    (["model.vocab_size=-1"], "model.vocab_size"),
    (["train.compile=true", "parallel.sequence_parallel=true"], "train.compile"),
])
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(None, overrides)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_futur: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.n_futur"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_every_field_is_documented():
    table = reference_markdown()
    assert "`model.n_future`" in table and "`run.dir`" in table
    assert "|  |" not in table.replace("| `None` |", "")  # no empty doc cell


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))
    assert len(configs) >= 13
    for path in configs:
        load_config(path)


def test_readme_config_reference_is_current():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert section.strip() == reference_markdown().strip(), \
        "README config reference is stale: regenerate with `megatrain config --reference`"

"""Export to Meta's and Hugging Face's formats, and back: load_exported and init.path.

What is protected: params.json counts layers as Meta's model builds them; run dir -> meta ->
load_exported and -> a new run's step-0 weights are exact (one process, FSDP and DeepSpeed at
dp=2); the HF Llama's logits are megatrain's head-1 logits, with a negative control showing the
comparison catches a missing RoPE permutation; a wrong model shape is refused by key.
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from megatrain.config import Config, ModelConfig, load_config
from megatrain.errors import CheckpointError, ConfigError, UserError
from megatrain.inference import export as export_module
from megatrain.inference.export import export_run, write_hf
from megatrain.inference.init_from import read_init_weights
from megatrain.inference.load import load_exported, load_model
from megatrain.inference.meta_format import meta_params, model_config_of, read_meta
from megatrain.model.mtp import MTPTransformer
from tests.parallel_harness import full_params, run_ranks
from tests.test_trainer import REPO, _overrides

HF_RTOL = 1e-5  # fp32, relative to the largest logit


def _small_cfg(**overrides) -> ModelConfig:
    base = dict(n_layers=6, n_future=4, dim=32, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16)
    base.update(overrides)
    return ModelConfig(**base)


def _random_model(cfg: ModelConfig, seq_len=32) -> MTPTransformer:
    """Weights far from the init (norm gains included), so a misplaced row shows in the logits."""
    model = MTPTransformer(cfg, seq_len, seed=3).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    """A tiny n_future=3 run (3 steps) with one checkpoint, on the byte-level test dataset."""
    from megatrain.trainer import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, _overrides(dataset, run, **{"train.steps": 3, "checkpoint.every": 0,
                                                        "train.eval_every": 0, "model.n_future": 3})))
    return run


@pytest.fixture(scope="module")
def meta_export(trained_run, tmp_path_factory):
    return export_run(trained_run, "meta", tmp_path_factory.mktemp("exports") / "meta").out


# ---- Meta's format ------------------------------------------------------------------------------
@pytest.mark.parametrize("n_future", [1, 4])
def test_params_json_counts_layers_as_metas_model_builds_them(n_future):
    """Meta's model builds n_layers - n_future_tokens + 1 `layers` (trunk + head 1) and
    n_future_tokens - 1 `extra_heads`: its n_layers is our model.n_layers, all layers."""
    cfg = _small_cfg(n_future=n_future)
    params = meta_params(cfg)
    state = MTPTransformer(cfg, 8).state_dict()
    layers = {name.split(".")[1] for name in state if name.startswith("layers.")}
    extra = {name.split(".")[1] for name in state if name.startswith("extra_heads.")}
    assert params["n_layers"] == cfg.n_layers == 6
    assert len(layers) == params["n_layers"] - params["n_future_tokens"] + 1, (layers, params)
    assert len(extra) == params["n_future_tokens"] - 1, (extra, params)
    assert model_config_of(params, "params.json") == cfg  # and back, key for key


def test_meta_params_fill_llama_defaults_and_refuse_unknown_keys():
    params = {"dim": 32, "n_layers": 4, "n_heads": 4, "vocab_size": -1, "max_seq_len": 2048}
    cfg = model_config_of(params, "params.json", vocab_size=100)
    assert (cfg.vocab_size, cfg.multiple_of, cfg.n_future, cfg.n_kv_heads) == (100, 256, 1, None)
    with pytest.raises(CheckpointError, match="use_scaled_rope"):
        model_config_of({**params, "use_scaled_rope": True}, "params.json")


def test_meta_export_refuses_heads_its_layout_cannot_hold(trained_run, tmp_path):
    from megatrain.inference import meta_format

    with pytest.raises(ConfigError, match="model.head_type=linear"):
        meta_format.check_meta_exportable(_small_cfg(head_type="linear"))
    with pytest.raises(ConfigError, match="model.head_type=anticausal"):
        export_module.check_hf_exportable(_small_cfg(head_type="anticausal"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        export_run(trained_run, "meta", tmp_path / "busy")


def test_run_dir_to_meta_to_load_exported_is_exact(trained_run, meta_export):
    files = sorted(p.name for p in meta_export.iterdir())
    assert files == ["consolidated.pth", "params.json", "tokenizer.json"]
    params = json.loads((meta_export / "params.json").read_text())
    assert params["n_future_tokens"] == 3 and params["n_layers"] == 4
    original, run_cfg = load_model(trained_run)
    loaded, cfg = load_exported(meta_export)
    assert cfg.model.n_future == 3 and cfg.model.vocab_size == run_cfg.model.vocab_size
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    tokens = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert torch.equal(original(tokens, return_all_heads=True), loaded(tokens, return_all_heads=True))


# ---- Hugging Face's format ----------------------------------------------------------------------
def _hf_relative_error(model: MTPTransformer, cfg: Config, out: Path) -> float:
    from transformers import LlamaForCausalLM

    out.mkdir()
    write_hf(model.state_dict(), cfg, out)
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


@pytest.mark.parametrize("n_future", [1, 4])
def test_hf_llama_logits_equal_head_1_logits(n_future, tmp_path):
    pytest.importorskip("transformers")
    cfg = Config(model=_small_cfg(n_future=n_future))
    cfg.data.seq_len = 32
    err = _hf_relative_error(_random_model(cfg.model), cfg, tmp_path / "hf")
    assert err <= HF_RTOL, f"HF logits differ from head 1's by {err:.3e} (relative) > {HF_RTOL}"
    extra = tmp_path / "hf" / "extra_heads.safetensors"
    assert extra.is_file() == (n_future > 1)


def test_replicated_heads_export_to_hf_and_init_path_reads_them_back(tmp_path):
    """head_type=replicated: the Llama is the full trunk with head 1's unembedding; heads 2..n's
    own unembeddings go to extra_heads.safetensors, from which init.path reads every weight back
    (and drops or adds heads). Meta's format, which has no such heads, refuses them."""
    pytest.importorskip("transformers")
    from megatrain.inference import meta_format
    from megatrain.inference.init_from import read_init_weights

    cfg = Config(model=_small_cfg(n_layers=3, n_future=3, head_type="replicated"))
    cfg.data.seq_len = 32
    model = _random_model(cfg.model)
    err = _hf_relative_error(model, cfg, tmp_path / "hf")
    assert err <= HF_RTOL, f"HF logits differ from head 1's by {err:.3e} (relative) > {HF_RTOL}"
    state = model.state_dict()
    back = read_init_weights(str(tmp_path / "hf"), cfg.model)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    fewer = read_init_weights(str(tmp_path / "hf"), dataclasses.replace(cfg.model, n_future=2))
    assert "extra_outputs.1.weight" not in fewer
    assert torch.equal(fewer["extra_outputs.0.weight"], state["extra_outputs.0.weight"])
    more = read_init_weights(str(tmp_path / "hf"), dataclasses.replace(cfg.model, n_future=4))
    assert "fresh" in more.summary and not torch.equal(more["extra_outputs.2.weight"], state["output.weight"])
    with pytest.raises(ConfigError, match="model.head_type=transformer cannot start from"):
        read_init_weights(str(tmp_path / "hf"), dataclasses.replace(cfg.model, head_type="transformer",
                                                                    n_layers=6))
    with pytest.raises(ConfigError, match="model.head_type=replicated cannot be written in Meta's format"):
        meta_format.check_meta_exportable(cfg.model)


def test_comparison_catches_a_missing_rope_permutation(tmp_path, monkeypatch):
    """Negative control: without reordering wq/wk rows (HF's rotate_half pairs other dimensions)
    the same comparison must fail."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(export_module, "rope_rows_to_hf", lambda weight, n_heads: weight)
    cfg = Config(model=_small_cfg(n_future=2))
    cfg.data.seq_len = 32
    err = _hf_relative_error(_random_model(cfg.model), cfg, tmp_path / "hf")
    assert err > 100 * HF_RTOL, f"unpermuted wq/wk gave only {err:.3e}: the comparison proves nothing"


def test_hf_export_of_a_run_loads_with_its_tokenizer_and_extra_heads(trained_run, tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = export_run(trained_run, "hf", tmp_path / "hf").out
    model, cfg = load_model(trained_run)
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    code = b"def f(x):\n    return x"
    ids = tokenizer(code.decode(), add_special_tokens=False)["input_ids"]
    assert ids == list(code)  # the byte-level test tokenizer: id = byte value
    assert tokenizer.eos_token_id == hf.config.eos_token_id == 256
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= HF_RTOL
    with safe_open(str(out / "extra_heads.safetensors"), "pt") as f:
        assert f.metadata()["n_future_tokens"] == "3"
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), model.state_dict()[name]), name


# ---- init.path: a new run starts from the export ------------------------------------------------
def _init_overrides(dataset, run_dir, export_dir, **extra):
    return _overrides(dataset, run_dir, **{"model.n_future": 3, "train.eval_every": 0,
                                           "checkpoint.every": 0, "init.path": str(export_dir), **extra})


def _assert_equals_export(params: dict, export_dir: Path):
    state, _ = read_meta(export_dir)
    assert params.keys() == state.keys()
    for name, value in params.items():
        assert torch.equal(value.cpu().float(), state[name].float()), name


def test_new_run_starts_from_the_export_and_a_resume_ignores_it(dataset, meta_export, tmp_path):
    from megatrain.trainer import setup, train

    run_dir = tmp_path / "run"
    run = setup(load_config(None, _init_overrides(dataset, run_dir, meta_export)))
    try:
        _assert_equals_export(full_params(run.engine.stages[0].named_parameters()), meta_export)
        assert not run.engine.optimizers[0].state  # fresh: no moments, no step count
    finally:
        run.logger.close()
        run.lock.release()
    train(load_config(None, _init_overrides(dataset, run_dir, meta_export, **{"train.steps": 2})))
    # a resume keeps its checkpoint: init.path is not even read (here it no longer exists)
    result = train(load_config(None, _init_overrides(dataset, run_dir, tmp_path / "gone",
                                                     **{"train.steps": 3})))
    assert result.step == 3


def test_init_refuses_another_model_shape_by_key(meta_export):
    _, exported = read_meta(meta_export)
    for key, value, fix in (("dim", 64, "model.dim=32"), ("n_future", 2, "model.n_future=3"),
                            ("n_layers", 6, "model.n_layers=4"), ("vocab_size", 512, "model.vocab_size=320")):
        with pytest.raises(ConfigError, match=fix):
            read_init_weights(str(meta_export), dataclasses.replace(exported, **{key: value}))
    wider = dataclasses.replace(exported, multiple_of=exported.multiple_of * 4)  # another SwiGLU width
    with pytest.raises(ConfigError, match=f"model.multiple_of={exported.multiple_of}"):
        read_init_weights(str(meta_export), wider)
    with pytest.raises(CheckpointError, match="not a Meta-format folder"):
        read_init_weights(str(meta_export / "missing"), exported)


def _start_weights(rank, overrides):
    """One rank's step-0 weights, gathered whole, of a run set up by the trainer."""
    from megatrain.trainer import setup

    run = setup(load_config(None, overrides))
    try:
        if run.cfg.parallel.dp_engine == "deepspeed":  # ZeRO's fp32 master copy: what it steps
            from deepspeed.utils import safe_get_full_fp32_param
            return {name: safe_get_full_fp32_param(p).clone() for name, p in run.engine.named_parameters()}
        return full_params(run.engine.stages[0].named_parameters())
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_dp2_run_starts_from_the_export(engine, dataset, meta_export, tmp_path):
    if engine == "deepspeed":
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extra = {"parallel.dp": 2, "parallel.dp_engine": engine}
    if engine == "deepspeed":
        extra["parallel.zero_stage"] = 2
    overrides = _init_overrides(dataset, tmp_path / "run", meta_export, **extra)
    for params in run_ranks(2, _start_weights, overrides):
        _assert_equals_export(params, meta_export)


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_export_prints_the_files_and_refuses_bad_input(trained_run, tmp_path, capsys):
    from megatrain.cli import main

    assert main(["export", "--run-dir", str(trained_run), "--format", "meta", "--out",
                 str(tmp_path / "out")]) == 0
    assert "consolidated.pth, params.json, tokenizer.json" in capsys.readouterr().out
    assert main(["export", "--run-dir", str(trained_run), "--checkpoint", "7", "--format", "meta",
                 "--out", str(tmp_path / "other")]) == 2
    assert "--checkpoint=7: there is no checkpoint of that step" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main(["export", "--run-dir", str(tmp_path / "no_such_run"), "--format", "meta", "--out",
                 str(tmp_path / "other")]) == 2
    assert f"{tmp_path / 'no_such_run'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()  # control: a folder without checkpoints says so instead
    assert main(["export", "--run-dir", str(tmp_path / "empty_run"), "--format", "meta", "--out",
                 str(tmp_path / "other")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err

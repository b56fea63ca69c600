"""Sequential MTP modules exported where serving code runs them: transformers' own
``generate(..., use_mtp=True)`` loads a ``--format hf`` export offline (remote code), returns
megatrain's greedy tokens, and its MTP layers draft exactly what megatrain's modules draft from
the same context; ``--format deepseek-mtp`` holds DeepSeek-V3's key layout; ``init.path`` reads
the export back, with or without the modules; the Meta format refuses them."""

import dataclasses
import json

import pytest
import torch

from megatrain.config import Config, DataConfig, ModelConfig, load_config
from megatrain.inference.export import export_run, write_hf
from megatrain.inference.generate import Generator
from megatrain.model.mtp import MTPTransformer
from tests.test_inference import fit_counting
from tests.test_trainer import _overrides

VOCAB, N_LAYERS, N_FUTURE = 16, 2, 3  # 2 trunk layers, D = 2 depths


def _cfg(**kw) -> ModelConfig:
    base = dict(n_layers=N_LAYERS, n_future=N_FUTURE, dim=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                multiple_of=16, mtp_kind="sequential")
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def counting_model():
    """Depths that learned a counting task (so drafts are kept and rejected both: transformers'
    cache corrections after a partial accept run too), with norm gains far from 1 (so reading the
    hidden state before or after a norm would show)."""
    torch.manual_seed(0)
    model = MTPTransformer(_cfg(), max_seq_len=96)
    g = torch.Generator().manual_seed(1)
    fit_counting(model, N_FUTURE, 80, g, vocab=VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    return model.eval()


def _export(model, out, **config):
    out.mkdir()
    write_hf(model.state_dict(), Config(model=model.cfg, data=DataConfig(seq_len=96)), out)
    if config:  # an export edited afterwards (the negative control)
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


def _hf_generate_with_drafts(out, prompt, new, monkeypatch):
    """transformers' greedy ``generate(use_mtp=True)`` on the export, and every drafting call's
    (context, drafts)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.generation import candidate_generator

    calls = []
    original = candidate_generator.MTPCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidates, logits = original(self, input_ids, *args, **kwargs)
        if candidates.shape[1] > input_ids.shape[1]:  # the first call only lets the model prefill
            calls.append((input_ids[0].tolist(), candidates[0, input_ids.shape[1]:].tolist()))
        return candidates, logits

    monkeypatch.setattr(candidate_generator.MTPCandidateGenerator, "get_candidates", recording)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, use_mtp=True)
    return tokens[0, len(prompt):].tolist(), calls


def _megatrain_drafts(model, context):
    """What megatrain's depths draft after ``context`` (x_0 .. x_P and head 1's t0): the chain's
    drafts (tests/test_inference.py checks the decoder makes these) via one full forward."""
    depths = model.layout.n_depths
    sequence = list(context)
    with torch.no_grad():
        for k in range(1, depths + 1):  # depth k reads the token depth k-1 drafted
            full = model(torch.tensor([sequence]), return_all_heads=True)[0, len(context) - 2]
            sequence.append(int(full[k].argmax()))
    return sequence[len(context):]


def _random_model():
    """Random weights, far from the init: drafts that are almost never kept (transformers then
    crops and recomputes its MTP cache after every step)."""
    model = MTPTransformer(_cfg(), max_seq_len=96, seed=3).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


@pytest.mark.slow
def test_transformers_generate_use_mtp_matches_megatrain_tokens_and_drafts(counting_model, tmp_path,
                                                                            monkeypatch):
    accepted = []
    for name, model in (("counting", counting_model), ("random", _random_model())):
        out = _export(model, tmp_path / name)
        for prompt in ([3, 5, 7, 9], [1, 14, 2, 2, 9], [6, 0, 6, 11, 4, 4, 12]):  # on and off task
            ours = Generator(model).generate([prompt], 24).tokens[0]
            theirs, calls = _hf_generate_with_drafts(out, prompt, 24, monkeypatch)
            assert theirs == ours
            assert calls and all(drafts == _megatrain_drafts(model, context) for context, drafts in calls)
            for context, drafts in calls:  # how many of the drafts the output kept
                after = ours[len(context) - len(prompt):]
                accepted.append(next((k for k, (a, b) in enumerate(zip(drafts, after)) if a != b),
                                     min(len(drafts), len(after))))
    assert {0, 1, N_FUTURE - 1} <= set(accepted), accepted  # every path of the verification ran


def test_the_draft_comparison_catches_an_export_that_reads_the_other_concatenation(counting_model,
                                                                                     tmp_path, monkeypatch):
    """Negative control: the same weights told to put the hidden half first draft differently, and
    the comparison sees it (while verification keeps the output right)."""
    out = _export(counting_model, tmp_path / "hf", mtp_hidden_states_first=True)
    theirs, calls = _hf_generate_with_drafts(out, [3, 5, 7, 9], 12, monkeypatch)
    assert theirs == Generator(counting_model).generate([[3, 5, 7, 9]], 12).tokens[0]
    assert any(drafts != _megatrain_drafts(counting_model, context) for context, drafts in calls)


def test_deepseek_mtp_export_has_the_layout_its_loaders_read(counting_model, tmp_path):
    """DeepSeek-V3's released key layout for the MTP layers (model.layers.{N+k}), as vLLM's
    deepseek_mtp loader renames it: enorm, hnorm, eh_proj, shared_head.{norm,head} and embed_tokens
    stay at the layer, everything else is the layer's block (mtp_block)."""
    from safetensors import safe_open

    write_hf(counting_model.state_dict(), Config(model=counting_model.cfg, data=DataConfig(seq_len=96)),
             tmp_path, fmt="deepseek-mtp")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == config["num_mtp_layers"] == 2
    assert config["num_hidden_layers"] == N_LAYERS
    dim, ffn = 32, counting_model.mtp[0].block.feed_forward.w1.weight.shape[0]
    own = {"enorm.weight": (dim,), "hnorm.weight": (dim,), "eh_proj.weight": (dim, 2 * dim),
           "shared_head.norm.weight": (dim,), "shared_head.head.weight": (VOCAB, dim),
           "embed_tokens.weight": (VOCAB, dim)}
    block = {"input_layernorm.weight": (dim,), "post_attention_layernorm.weight": (dim,),
             "self_attn.q_proj.weight": (dim, dim), "self_attn.k_proj.weight": (dim // 2, dim),
             "self_attn.v_proj.weight": (dim // 2, dim), "self_attn.o_proj.weight": (dim, dim),
             "mlp.gate_proj.weight": (ffn, dim), "mlp.up_proj.weight": (ffn, dim),
             "mlp.down_proj.weight": (dim, ffn)}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for layer in (N_LAYERS, N_LAYERS + 1):
        mine = {k.removeprefix(f"model.layers.{layer}."): v for k, v in shapes.items()
                if k.startswith(f"model.layers.{layer}.")}
        assert mine == {**own, **block}, sorted(set(mine) ^ (set(own) | set(block)))


def test_init_path_reads_the_hf_export_with_or_without_the_modules(counting_model, dataset, tmp_path):
    from megatrain.inference.init_from import read_init_weights

    out = _export(counting_model, tmp_path / "hf")
    state = counting_model.state_dict()
    same = read_init_weights(str(out), counting_model.cfg)
    for name, tensor in state.items():
        torch.testing.assert_close(same[name], tensor, rtol=0, atol=0, msg=name)
    trunk_only = read_init_weights(str(out), _cfg(n_future=1))  # D' = 0: finetune the main model
    assert not any(name.startswith("mtp.") for name in trunk_only)
    assert torch.equal(trunk_only["layers.1.attention.wq.weight"], state["layers.1.attention.wq.weight"])
    deeper = read_init_weights(str(out), _cfg(n_future=4))  # a third depth starts from its own init
    assert "fresh" in deeper.summary
    assert torch.equal(deeper["mtp.1.eh_proj.weight"], state["mtp.1.eh_proj.weight"])
    with pytest.raises(Exception, match="model.mtp_kind=parallel cannot start from .*sequential"):
        read_init_weights(str(out), _cfg(mtp_kind="parallel", n_layers=4))


def test_sequential_run_refuses_meta_and_inits_the_same_from_its_checkpoint_and_deepseek_export(
        dataset, tmp_path, capsys):
    from megatrain.cli import main
    from megatrain.trainer import train

    run = tmp_path / "run"
    train(load_config(None, _overrides(dataset, run, **{"train.steps": 1, "checkpoint.every": 0,
                                                        "train.eval_every": 0, "model.mtp_kind": "sequential",
                                                        "model.n_layers": 2, "model.n_future": 2})))
    capsys.readouterr()
    assert main(["export", "--run-dir", str(run), "--format", "meta", "--out", str(tmp_path / "m")]) == 2
    assert "model.mtp_kind=sequential cannot be written in Meta's format" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    exported = export_run(run, "deepseek-mtp", tmp_path / "ds")
    assert "modeling_mtp_llama.py" in exported.files and "tokenizer.json" in exported.files

    # init.path from the run dir's checkpoint and from the DeepSeek-layout export: the same
    # weights, the modules kept (D' = D) or dropped (D' = 0, finetuning the main model)
    from megatrain.inference.init_from import read_init_weights
    from megatrain.run_dir import RunDir

    cfg = RunDir(run).read_config().model
    from_run = read_init_weights(str(run), cfg)
    from_export = read_init_weights(str(tmp_path / "ds"), cfg)
    assert any(name.startswith("mtp.") for name in from_run) and set(from_run) == set(from_export)
    for name in from_run:
        torch.testing.assert_close(from_export[name], from_run[name], rtol=0, atol=0, msg=name)
    trunk_only = dataclasses.replace(cfg, n_future=1)
    for source in (run, tmp_path / "ds"):
        dropped = read_init_weights(str(source), trunk_only)
        assert not any(name.startswith("mtp.") for name in dropped), source
        assert torch.equal(dropped["layers.0.attention.wq.weight"], from_run["layers.0.attention.wq.weight"])


def test_finetuning_with_the_modules_dropped_trains_from_the_export(dataset, tmp_path):
    """README's D' = 0 finetune: `init.path=<hf export> model.mtp_kind=sequential model.n_future=1`
    (it crashed dividing lambda by D = 0 before the first step)."""
    from megatrain.cli import main
    from megatrain.config import head_loss_weights
    from megatrain.trainer import train

    base = {"checkpoint.every": 0, "train.eval_every": 0, "model.mtp_kind": "sequential", "model.n_layers": 2}
    run = tmp_path / "run"
    train(load_config(None, _overrides(dataset, run, **base, **{"train.steps": 1, "model.n_future": 2})))
    assert main(["export", "--run-dir", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_mtp_layers"] == 1
    cfg = load_config(None, _overrides(dataset, tmp_path / "ft", **base, **{
        "train.steps": 2, "model.n_future": 1, "init.path": str(tmp_path / "hf")}))
    assert head_loss_weights(cfg) == [1.0]
    result = train(cfg)
    assert result.step == 2 and len(result.head_losses) == 1
    assert torch.isfinite(torch.tensor(result.head_losses)).all()


def test_a_parallel_model_is_refused_the_deepseek_mtp_format_with_the_fix(dataset, tmp_path, capsys):
    from megatrain.cli import main
    from megatrain.trainer import train

    run = tmp_path / "run"
    train(load_config(None, _overrides(dataset, run, **{"train.steps": 1, "checkpoint.every": 0,
                                                        "train.eval_every": 0, "model.n_layers": 3,
                                                        "model.n_future": 2})))
    capsys.readouterr()
    out = tmp_path / "d"
    assert main(["export", "--run-dir", str(run), "--format", "deepseek-mtp", "--out", str(out)]) == 2
    assert "--format deepseek-mtp holds sequential MTP modules" in capsys.readouterr().err
    assert not out.exists()

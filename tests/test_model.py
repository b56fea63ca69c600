"""Model structure: parameter matching, Meta checkpoint names, causality, shapes."""

import pytest
import torch

from megatrain.model.mtp import MTPTransformer, count_parameters
from megatrain.model.transformer import apply_rope, rope_tables


def test_transformer_heads_are_parameter_matched(tiny_model_cfg):
    counts = {n: count_parameters(MTPTransformer(tiny_model_cfg(n_layers=5, n_future=n), 16))
              for n in (1, 2, 4)}
    assert len(set(counts.values())) == 1, counts


def test_parameter_names_follow_meta_mtp_checkpoints(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(n_layers=5, n_future=3), 16)
    names = {n for n, _ in model.named_parameters()}
    assert "tok_embeddings.weight" in names and "norm.weight" in names and "output.weight" in names
    assert {f"layers.{i}.attention.wq.weight" for i in range(3)} <= names  # 2 trunk + head 1
    assert "layers.3.attention.wq.weight" not in names
    assert {"extra_heads.0.feed_forward.w1.weight", "extra_heads.1.ffn_norm.weight"} <= names
    assert model.head_module(0) is model.layers["2"]
    assert model.layout.trunk_keys == ["0", "1"]
    assert model.layout.head_paths == ["layers.2", "extra_heads.0", "extra_heads.1"]


def test_linear_heads_keep_a_full_depth_trunk(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(n_layers=4, n_future=4, head_type="linear"), 16)
    assert model.layout.trunk_keys == ["0", "1", "2", "3"] and model.layout.head1_key is None
    assert len(model.linear_heads) == 4 and len(model.extra_heads) == 0
    assert model.head_module(3) is model.linear_heads[3]


def test_replicated_heads_are_one_unembedding_each_on_a_full_depth_trunk(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(n_layers=4, n_future=3, head_type="replicated"), 16)
    assert model.layout.trunk_keys == ["0", "1", "2", "3"] and model.layout.head_paths == []
    assert len(model.extra_outputs) == 2 and len(model.extra_heads) == 0
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 6))
    hidden = model.norm(model.trunk(tokens))
    torch.testing.assert_close(model(tokens, return_all_heads=True)[:, :, 2], model.extra_outputs[1](hidden))


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal", "anticausal", "replicated"])
@pytest.mark.parametrize("n_future", [1, 2, 4])
def test_layout_names_every_parameter_exactly_once(tiny_model_cfg, head_type, n_future):
    """The layout is the one description other modules use: the embedding, its trunk keys, its
    head paths and the shared parts together hold every parameter of the model, each once."""
    from megatrain.model.layout import SHARED_BY_HEADS

    model = MTPTransformer(tiny_model_cfg(n_layers=5, n_future=n_future, head_type=head_type), 16)
    layout = model.layout
    parts = (["tok_embeddings"] + [f"layers.{k}" for k in layout.trunk_keys] + layout.head_paths
             + layout.extra_unembedding_paths + list(SHARED_BY_HEADS))
    owners = {}
    for name, _ in model.named_parameters():
        owner = [part for part in parts if name.startswith(part + ".")]
        assert len(owner) == 1, (name, owner)
        owners.setdefault(owner[0], []).append(name)
    assert set(owners) == set(parts), set(parts) - set(owners)
    assert sorted(model.layers) == sorted(layout.layer_keys)
    assert len(layout.trunk_keys) + n_future * (head_type not in ("linear", "replicated")) == 5
    assert [model.get_submodule(p) for p in layout.head_paths] == [
        model.head_module(i) for i in range(n_future) if model.head_module(i) is not None]
    unembeddings = ["output", *layout.extra_unembedding_paths] if head_type == "replicated" \
        else ["output"] * n_future
    assert [model.unembedding(i) for i in range(n_future)] == [model.get_submodule(p) for p in unembeddings]


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal", "anticausal", "replicated"])
def test_forward_shapes_and_all_heads(tiny_model_cfg, head_type):
    cfg = tiny_model_cfg(n_layers=5, n_future=3, head_type=head_type)
    model = MTPTransformer(cfg, 16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    all_heads = model(tokens, return_all_heads=True)
    assert all_heads.shape == (2, 16, 3, cfg.vocab_size)
    torch.testing.assert_close(model(tokens), all_heads[:, :, 0])


@pytest.mark.parametrize("head_type", ["transformer", "causal", "anticausal", "replicated"])
def test_every_head_is_causal_in_time(tiny_model_cfg, head_type):
    cfg = tiny_model_cfg(n_layers=4, n_future=2, head_type=head_type)
    model = MTPTransformer(cfg, 16)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    a, b = model(tokens, return_all_heads=True), model(changed, return_all_heads=True)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_shapes(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(n_heads=4, n_kv_heads=1), 16)
    assert model.layers["0"].attention.wk.weight.shape == (8, 32)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 97)


def test_rope_rotates_pairs_like_complex_multiplication():
    cos, sin = rope_tables(8, 6, 10000.0)
    x = torch.randn(1, 6, 2, 8)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)))
                             * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None])
    torch.testing.assert_close(apply_rope(x, cos, sin), ref.flatten(-2))


def test_xformers_backend_on_cpu_fails_clearly(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(attention="xformers"), 16)
    with pytest.raises(RuntimeError, match="model.attention"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("head_type", ["transformer", "linear", "replicated"])
def test_meta_build_then_materialize_equals_eager_init(tiny_model_cfg, head_type):
    """What every rank does for FSDP/TP/PP: build on meta, then fill from parameter names."""
    from megatrain.parallel import materialize
    from megatrain.parallel.pipeline import split_model

    cfg = tiny_model_cfg(n_layers=5, n_future=3, head_type=head_type)
    eager = MTPTransformer(cfg, 16, seed=7)
    with torch.device("meta"):
        meta = MTPTransformer(cfg, 16, seed=7)
    stages = split_model(meta, [meta.layout.n_trunk_layers], [0])
    materialize(stages, torch.device("cpu"), seed=7, max_seq_len=16)
    got = dict(stages[0].named_parameters())
    assert got.keys() == dict(eager.named_parameters()).keys()
    for name, p in eager.named_parameters():
        assert torch.equal(got[name], p), name
    assert torch.equal(stages[0].rope_cos, eager.rope_cos)
    other_seed = MTPTransformer(cfg, 16, seed=8)
    assert not torch.equal(other_seed.output.weight, eager.output.weight)


def test_initial_values_are_made_on_the_cpu_whatever_the_default_device(tiny_model_cfg):
    """Built under ``with torch.device("cuda")`` the model's init would otherwise draw a CUDA tensor
    with a CPU generator, which CUDA refuses; the meta device stands in for it here."""
    from megatrain.model.mtp import initial_value

    cfg = tiny_model_cfg()
    expected = initial_value("layers.0.attention.wq.weight", (8, 4), cfg, seed=3)
    with torch.device("meta"):
        value = initial_value("layers.0.attention.wq.weight", (8, 4), cfg, seed=3)
        norm = initial_value("norm.weight", (4,), cfg, seed=3)
    assert value.device.type == "cpu" and norm.device.type == "cpu"
    assert torch.equal(value, expected)

"""The apex options (``model.norm_impl=apex``, ``train.optimizer=apex_fused_adam``) and xformers.

apex is not installable here (not on PyPI; built from source on a CUDA machine), so the apex
code path is exercised with a fake ``apex`` package injected into ``sys.modules`` whose classes
record how they were built; the refusal is tested against the real environment. The defaults
stay torch's own RMSNorm and AdamW, also when apex is importable (the negative control).
"""

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from megatrain.config import Config, TrainConfig, validate
from megatrain.errors import ConfigError
from megatrain.model.mtp import MTPTransformer
from megatrain.optim import build_optimizer

APEX_PRESENT = importlib.util.find_spec("apex") is not None


class FakeFusedRMSNorm(nn.RMSNorm):
    """apex.normalization.FusedRMSNorm's constructor and parameter name (``weight``)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)


class FakeFusedAdam(torch.optim.AdamW):
    """apex.optimizers.FusedAdam's constructor; records its keyword arguments."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, **kwargs):
        self.apex_kwargs = dict(lr=lr, betas=betas, eps=eps, adam_w_mode=adam_w_mode, **kwargs)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@pytest.fixture
def fake_apex(monkeypatch):
    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    optimizers = types.ModuleType("apex.optimizers")
    normalization.FusedRMSNorm = FakeFusedRMSNorm
    optimizers.FusedAdam = FakeFusedAdam
    apex.normalization, apex.optimizers = normalization, optimizers
    for name, module in (("apex", apex), ("apex.normalization", normalization),
                         ("apex.optimizers", optimizers)):
        monkeypatch.setitem(sys.modules, name, module)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.RMSNorm)]


@pytest.mark.skipif(APEX_PRESENT, reason="apex is importable here")
def test_apex_norm_refuses_clearly_without_apex(tiny_model_cfg):
    with pytest.raises(ConfigError) as err:
        MTPTransformer(tiny_model_cfg(norm_impl="apex"), max_seq_len=16)
    message = str(err.value)
    assert "model.norm_impl=apex" in message and "not on PyPI" in message, message
    assert "github.com/NVIDIA/apex" in message and "model.norm_impl=torch" in message, message


@pytest.mark.skipif(APEX_PRESENT, reason="apex is importable here")
def test_apex_fused_adam_refuses_clearly_without_apex():
    model = nn.Linear(4, 4)
    with pytest.raises(ConfigError) as err:
        build_optimizer(model, TrainConfig(optimizer="apex_fused_adam"), "cuda")
    message = str(err.value)
    assert "train.optimizer=apex_fused_adam" in message and "not on PyPI" in message, message
    assert "train.optimizer=adamw" in message, message


def test_apex_fused_adam_refuses_a_cpu_step(fake_apex):
    with pytest.raises(ConfigError, match="CUDA only"):
        build_optimizer(nn.Linear(4, 4), TrainConfig(optimizer="apex_fused_adam"), "cpu")


def test_apex_norm_is_used_everywhere_when_importable(fake_apex, tiny_model_cfg):
    """Every block norm and the shared final norm are apex's, with the same parameter names (and
    so the same initial values and checkpoint keys) as the torch build."""
    apex_model = MTPTransformer(tiny_model_cfg(norm_impl="apex"), max_seq_len=16)
    torch_model = MTPTransformer(tiny_model_cfg(), max_seq_len=16)
    norms = _norms(apex_model)
    assert norms and all(type(m) is FakeFusedRMSNorm for m in norms), {type(m) for m in norms}
    assert type(apex_model.norm) is FakeFusedRMSNorm
    assert len(norms) == len(_norms(torch_model))
    theirs = torch_model.state_dict()
    for name, value in apex_model.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def test_apex_fused_adam_is_built_in_adamw_mode_when_importable(fake_apex):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.RMSNorm(4))
    cfg = TrainConfig(optimizer="apex_fused_adam")
    opt = build_optimizer(model, cfg, "cuda")
    assert type(opt) is FakeFusedAdam
    assert opt.apex_kwargs["adam_w_mode"] is True
    assert opt.apex_kwargs["betas"] == (cfg.beta1, cfg.beta2) and opt.apex_kwargs["lr"] == cfg.lr
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0


def test_defaults_stay_torch_even_when_apex_is_importable(fake_apex, tiny_model_cfg):
    """Negative control: with apex importable, the default config builds torch's RMSNorm and
    torch's AdamW, so the fake classes above are only reached by choosing them."""
    model = MTPTransformer(tiny_model_cfg(), max_seq_len=16)
    assert all(type(m) is nn.RMSNorm for m in _norms(model))
    opt = build_optimizer(model, TrainConfig(), "cpu")
    assert type(opt) is torch.optim.AdamW


def test_unknown_norm_or_optimizer_names_the_key():
    cfg = Config()
    cfg.model.norm_impl = "fused"
    with pytest.raises(ConfigError, match="model.norm_impl"):
        validate(cfg)
    cfg = Config()
    cfg.train.optimizer = "lion"
    with pytest.raises(ConfigError, match="train.optimizer"):
        validate(cfg)


def test_apex_norm_with_sequence_parallel_is_refused():
    cfg = Config()
    cfg.model.norm_impl = "apex"
    cfg.parallel.sequence_parallel = True
    with pytest.raises(ConfigError, match="model.norm_impl=apex with parallel.sequence_parallel"):
        validate(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_attention_on_cpu_fails_with_a_clear_message(tiny_model_cfg):
    model = MTPTransformer(tiny_model_cfg(attention="xformers"), max_seq_len=16)
    with pytest.raises(RuntimeError, match="model.attention=xformers") as err:
        model.trunk(torch.zeros(1, 8, dtype=torch.long))
    assert "sdpa" in str(err.value)

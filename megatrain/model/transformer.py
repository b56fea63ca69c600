"""Llama-style transformer block: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameter names follow Meta's Llama / multi-token-prediction checkpoints (``attention.wq``,
``feed_forward.w1``, ``attention_norm`` ...), so converting to and from those checkpoints
(megatrain/inference/meta_format.py) is a matter of names, not of layout. The module knows
nothing about process groups: parallelism is applied from outside (megatrain.parallel).
Attention takes an optional KV cache for inference (model/kv_cache.py); training never passes one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model.kv_cache import LayerCache

# apex is not on PyPI (the PyPI package named `apex` is an unrelated web toolkit, which also
# imports as `apex`): NVIDIA's is built from source against the installed CUDA torch.
APEX_BUILD_HINT = ("NVIDIA apex is not on PyPI (the PyPI package named 'apex' is an unrelated web "
                   "toolkit); build it from source on the CUDA machine: git clone "
                   "https://github.com/NVIDIA/apex && cd apex && pip install -v "
                   "--no-build-isolation --config-settings '--build-option=--cpp_ext' "
                   "--config-settings '--build-option=--cuda_ext' ./")


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    hidden = int(2 * 4 * cfg.dim / 3)
    if cfg.ffn_dim_multiplier is not None:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def model_rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables of ``cfg``'s attention heads for ``length`` positions."""
    return rope_tables(cfg.dim // cfg.n_heads, length, cfg.rope_theta)


def fill_rope_buffers(module: nn.Module, cfg: ModelConfig, length: int) -> None:
    """Write the RoPE tables into ``module``'s ``rope_cos`` / ``rope_sin`` buffers: a module built
    on the meta device and moved with ``to_empty`` holds uninitialised memory there."""
    cos, sin = model_rope_tables(cfg, length)
    module.rope_cos.copy_(cos)
    module.rope_sin.copy_(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3) ... as Meta's complex-number RoPE does."""
    # x: (B, T, n_heads, head_dim); cos/sin: (T, head_dim // 2), or (B, T, head_dim // 2) when the
    # rows sit at different positions (inference with a KV cache)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = (cos[:, :, None, :], sin[:, :, None, :]) if cos.dim() == 3 else \
        (cos[None, :, None, :], sin[None, :, None, :])
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.backend = cfg.attention
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)  # (B, T, H_kv, hd)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # inference: attend to every cached position up to the query's
            k, v, mask = cache.update(k, v)  # (B, span, H_kv, hd), mask (B, 1, T, span)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)
        elif self.backend == "xformers":
            out = _xformers_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, enable_gqa=k.shape[2] != q.shape[2],
            ).transpose(1, 2)  # (B, T, H, hd)
        return self.wo(out.reshape(batch, seq, -1))


def _xformers_attention(q, k, v):
    try:
        from xformers.ops import LowerTriangularMask, memory_efficient_attention
    except ImportError as err:
        raise RuntimeError("model.attention=xformers but xformers is not importable; "
                           "pip install xformers or use model.attention=sdpa") from err
    if not q.is_cuda:
        raise RuntimeError("model.attention=xformers has no CPU kernel; use model.attention=sdpa on CPU")
    if k.shape[2] != q.shape[2]:  # xformers wants matching heads: expand the shared KV heads
        repeat = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    return memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_norm(cfg: ModelConfig) -> nn.Module:
    """An RMSNorm over ``cfg.dim`` from ``model.norm_impl``. apex's FusedRMSNorm names its gain
    ``weight`` like ``nn.RMSNorm``, so checkpoints and the init are the same either way."""
    if cfg.norm_impl == "apex":
        try:
            from apex.normalization import FusedRMSNorm
        except ImportError as err:
            raise ConfigError(f"model.norm_impl=apex but apex's FusedRMSNorm is not importable "
                              f"({err}). {APEX_BUILD_HINT}; or set model.norm_impl=torch (the "
                              f"default: nn.RMSNorm, fused by train.compile).") from err
        return FusedRMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = build_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = build_norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        # cache by keyword: the sequence-parallel plan prepares exactly (x, cos, sin) positionally
        h = x + self.attention(in_compute_dtype(self.attention_norm(x)), cos, sin, cache=cache)
        return h + self.feed_forward(in_compute_dtype(self.ffn_norm(h)))


def in_compute_dtype(normed: torch.Tensor) -> torch.Tensor:
    """A norm's float32 output in autocast's dtype, cast once for the projections that read it.

    Under autocast RMSNorm returns float32 and each of wq/wk/wv (w1/w3) would cast it to bf16
    itself and keep its own copy for backward: three (two) bf16 copies of the activation per norm.
    Measured with the memory planner's trace at the 13B config (2 x 4096 tokens, tp 8, bf16): 1.33 GB
    kept per layer and microbatch before, 1.07 GB after. The values are identical
    (the same rounding of the same float32 numbers); only the projections' input gradients now
    meet in bf16 before the cast back, as they would with bf16 weights.
    """
    device = normed.device.type
    if torch.is_autocast_enabled(device):
        return normed.to(torch.get_autocast_dtype(device))
    return normed

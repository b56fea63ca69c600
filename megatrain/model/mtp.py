"""The multi-token prediction model: a shared trunk, n_future heads, one shared unembedding.

Parameter-matched as in Gloeckle et al. (2024): ``n_layers=L, n_future=n`` gives L-n trunk layers
and n one-layer heads. Where each part lives (Meta's release names) is ``LayerLayout``'s to say
(model/layout.py); how the heads run is ``MTPHeads``' (model/heads.py).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from megatrain.config import ModelConfig
from megatrain.model.heads import MTPHeads
from megatrain.model.kv_cache import ModelCache
from megatrain.model.layout import LayerLayout
from megatrain.model.mtp_module import MTPModule
from megatrain.model.transformer import TransformerBlock, build_norm, model_rope_tables


def initial_value(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Parameter ``name``'s initial value (float32, CPU), a function of its name and the seed only.

    Any rank can therefore produce any parameter, or the shard of it that it holds, whatever the
    parallel layout: a model built on the meta device, sharded, then materialised starts from
    exactly the weights of a single-process run. Norm gains are 1; residual-branch outputs (wo,
    w2) get std / sqrt(2 * n_layers) (GPT-2 / Megatron), every other matrix ``init_std``.
    """
    # device="cpu" explicitly: built under `with torch.device("cuda")` the tensor would otherwise
    # land on the GPU, whose normal_ refuses the CPU generator
    if len(shape) == 1:
        return torch.ones(shape, device="cpu")
    std = cfg.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / (2 * cfg.n_layers) ** 0.5
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)


class MTPTransformer(MTPHeads, nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int, seed: int = 0):
        super().__init__()
        self.seed = seed
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (from the dataset) before building")
        self.cfg = cfg
        self.layout = LayerLayout.of(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if self.layout.head_type == "linear" and not self.layout.sequential:
            self.linear_heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False)
                                              for _ in range(cfg.n_future))
        self.layers = nn.ModuleDict({key: TransformerBlock(cfg) for key in self.layout.layer_keys})
        n_extra = cfg.n_future - 1 if self.layout.heads_are_blocks else 0
        self.extra_heads = nn.ModuleList(TransformerBlock(cfg) for _ in range(n_extra))
        if self.layout.sequential:
            self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(self.layout.n_depths))
        self.norm = build_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if self.layout.replicated:
            self.extra_outputs = nn.ModuleList(nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
                                               for _ in range(cfg.n_future - 1))
        cos, sin = model_rope_tables(cfg, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not p.is_meta:  # built on the meta device: materialize() fills it later
                    p.copy_(initial_value(name, p.shape, self.cfg, self.seed))

    # ---- forward ---------------------------------------------------------------------------
    def trunk(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Embedding and trunk layers: tokens (B, T) -> hidden (B, T, D). With ``cache``
        (inference) the tokens sit at the cache's current positions."""
        h = self.tok_embeddings(tokens)
        if cache is None:
            cos, sin = self.rope(tokens.shape[1])
            for key in self.layout.trunk_keys:
                h = self.layers[key](h, cos, sin)
            return h
        for key in self.layout.trunk_keys:
            layer_cache = cache[f"layers.{key}"]
            h = self.layers[key](h, *self.rope(tokens.shape[1], layer_cache.positions), layer_cache)
        return h

    def forward(self, tokens: torch.Tensor, return_all_heads: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of head 1, or (B, T, n_future, V) of every head for inference (the
        sequential kind's depth k reads the embedding of tokens[t + k]: the window's own tokens,
        0 past its end).

        Training does not call this: it runs the trunk and hands the heads to the sequential
        loss (megatrain.mtp_loss) so that only one head's logits exist at a time.
        """
        h = self.trunk(tokens)
        if not return_all_heads and not self.head_type == "anticausal":
            return self.logits(self.head_forward(0, h))
        embedded = self.depth_embeddings(shifted_tokens(tokens, self.layout.n_depths)) \
            if self.layout.sequential else None
        outs = self.head_outputs(h, embedded=embedded)
        if not return_all_heads:
            return self.logits(outs[0])
        return torch.stack([self.logits(o, i) for i, o in enumerate(outs)], dim=-2)  # (B, T, n, V)


def shifted_tokens(tokens: torch.Tensor, n_depths: int) -> torch.Tensor:
    """(D, B, T): depth k's input token at position t, tokens[t + k] (0 past the end)."""
    out = torch.zeros((n_depths, *tokens.shape), dtype=tokens.dtype, device=tokens.device)
    for k in range(1, n_depths + 1):
        out[k - 1, :, :tokens.shape[1] - k] = tokens[:, k:]
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

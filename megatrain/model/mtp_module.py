"""One sequential multi-token-prediction module (DeepSeek-V3 §2.2), the sequential kind's depth k.

At position t, depth k combines what depth k-1 computed there with the embedding of token t+k and
predicts token t+k+1:

    h^k_t = block_k( eh_proj_k( [ enorm_k(Emb(x_{t+k})) ; hnorm_k(hbar^{k-1}_t) ] ) )
    logits = output( norm_k(h^k_t) ),      hbar^k_t = norm_k(h^k_t)

``hbar^0`` is the trunk's output after the main model's final ``norm``; each depth reads the
previous depth's output after that depth's own ``norm``. Both choices are what transformers'
``MtpModel`` (5.24, by default), Megatron-Core, SGLang and vLLM's ``deepseek_mtp`` do, so exported
modules draft in those engines what they drafted here (docs/design.md). The embedding and the
unembedding ``output`` are the main model's. ``model.mtp_concat=hidden_first`` swaps the two halves
of the projection's input (MiMo's order).
"""

from __future__ import annotations

import torch
from torch import nn

from megatrain.config import ModelConfig
from megatrain.model.kv_cache import LayerCache
from megatrain.model.transformer import TransformerBlock, build_norm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.enorm = build_norm(cfg)
        self.hnorm = build_norm(cfg)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = TransformerBlock(cfg)
        self.norm = build_norm(cfg)  # DeepSeek's shared_head.norm, transformers' post_norm
        self.hidden_first = cfg.mtp_concat == "hidden_first"

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        """embedded: Emb(x_{t+k}) (B, T, D); hidden: hbar^{k-1} (B, T, D) -> h^k before ``norm``."""
        e, h = self.enorm(embedded), self.hnorm(hidden)
        x = self.eh_proj(torch.cat([h, e] if self.hidden_first else [e, h], dim=-1))
        return self.block(x, cos, sin, cache=cache)

"""Key/value caches for inference: one per attention layer, trunk and heads alike.

Every row of a batch has its own length: rows hold prompts of different lengths and, under
self-speculative decoding, accept different numbers of drafted tokens. A cache therefore stores
keys and values by absolute position, ``(B, capacity, n_kv_heads, head_dim)``, and a forward
writes its new tokens at their own positions (``positions``: ``(B, T)``, set once per forward for
every layer through ``ModelCache.at``). A query at position p attends to the cached keys at
positions <= p. Entries past a row's length (prompt padding, rejected drafts) are never attended
before they are overwritten, so rolling a row back is only forgetting its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LayerCache:
    def __init__(self, batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, capacity, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions: torch.Tensor | None = None  # (B, T) of the current forward
        self.span = 0  # keys at positions < span may be attended in the current forward
        self.mask: torch.Tensor | None = None  # (B, 1, T, span), True = attend; shared by the layers
        self.rows: torch.Tensor | None = None  # (B, 1) row indices

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values (B, T, H_kv, hd) at their positions; return all keys and
        values up to the furthest position and the attention mask (B, 1, T, span), True = attend."""
        self.k[self.rows, self.positions] = k.to(self.k.dtype)
        self.v[self.rows, self.positions] = v.to(self.v.dtype)
        return self.k[:, :self.span], self.v[:, :self.span], self.mask


@dataclass
class ModelCache:
    """The caches of every attention layer of a model, by name (``layers.3``, ``extra_heads.0``)."""

    layers: dict[str, LayerCache]
    capacity: int

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> ModelCache:
        cfg = model.cfg
        n_kv, head_dim = cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
        param = next(model.parameters())
        names = [f"layers.{k}" for k in model.layout.trunk_keys] + model.layout.attention_paths
        layers = {name: LayerCache(batch, capacity, n_kv, head_dim, param.device, param.dtype)
                  for name in names}
        return cls(layers, capacity)

    def at(self, positions: torch.Tensor) -> ModelCache:
        """Bind this forward's token positions (B, T) to every layer's cache, with the attention
        mask they share (built once per forward, not once per layer)."""
        furthest = int(positions.max())
        if furthest >= self.capacity:
            raise ValueError(f"position {furthest} is beyond the cache's capacity "
                             f"{self.capacity} (the model's max_seq_len); generate fewer tokens")
        span = furthest + 1
        key_pos = torch.arange(span, device=positions.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        for cache in self.layers.values():
            cache.positions, cache.span, cache.mask, cache.rows = positions, span, mask, rows
        return self

    def __getitem__(self, name: str) -> LayerCache:
        return self.layers[name]

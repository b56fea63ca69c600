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

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values (B, T, H_kv, hd) at their positions; return all keys and
        values up to the furthest position and the attention mask (B, 1, T, span), True = attend."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, self.positions] = k.to(self.k.dtype)
        self.v[rows, self.positions] = v.to(self.v.dtype)
        key_pos = torch.arange(self.span, device=k.device)
        mask = key_pos[None, None, None, :] <= self.positions[:, None, :, None]
        return self.k[:, :self.span], self.v[:, :self.span], mask


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
        """Bind this forward's token positions (B, T) to every layer's cache."""
        if int(positions.max()) >= self.capacity:
            raise ValueError(f"position {int(positions.max())} is beyond the cache's capacity "
                             f"{self.capacity} (the model's max_seq_len); generate fewer tokens")
        span = int(positions.max()) + 1
        for cache in self.layers.values():
            cache.positions, cache.span = positions, span
        return self

    def __getitem__(self, name: str) -> LayerCache:
        return self.layers[name]

"""The MTP heads: which module each head is, the order they run in, and one head's forward.

One mixin, ``MTPHeads``, serves both the whole model (``MTPTransformer``) and the last pipeline
stage (``MTPStage``), so the sequential-heads loss, generation and the parallel code all run the
heads through the same code. A host provides ``layout`` (a ``LayerLayout``), the modules the
layout names (its heads, ``norm``, ``output``), the RoPE buffers ``rope_cos`` / ``rope_sin`` and
``holds_heads`` (false on pipeline stages other than the last).

Head types (``model.head_type``):
- transformer: every head reads the trunk output (the paper's default).
- linear: a full-depth trunk, each head a dim x dim linear map (paper ablation).
- causal: head 1 reads the trunk, head i reads head i-1's output (paper Appendix B).
- anticausal: head n reads the trunk, head i reads head i+1's output (paper Appendix B).
"""

from __future__ import annotations

import torch
from torch import nn

from megatrain.model.kv_cache import ModelCache
from megatrain.model.layout import LayerLayout


class MTPHeads:
    layout: LayerLayout
    holds_heads: bool = True

    @property
    def n_future(self) -> int:
        return self.layout.n_future

    @property
    def head_type(self) -> str:
        return self.layout.head_type

    def head_module(self, i: int) -> nn.Module:
        """Head i (0-based: head 0 predicts t+1)."""
        return self.get_submodule(self.layout.head_path(i))

    def head_params(self, i: int) -> list[nn.Parameter]:
        """Every parameter head i's loss depends on: its own, then the shared norm and unembedding."""
        return list(self.head_module(i).parameters()) + [self.norm.weight, self.output.weight]

    def all_head_params(self) -> list[nn.Parameter]:
        """The union of ``head_params`` over the heads, each parameter once, in a fixed order."""
        return list(dict.fromkeys(p for i in range(self.n_future) for p in self.head_params(i)))

    @property
    def head_order(self) -> list[int]:
        """The order heads are evaluated in; chained types feed each head the previous output."""
        order = list(range(self.n_future))
        return order[::-1] if self.head_type == "anticausal" else order

    @property
    def heads_are_chained(self) -> bool:
        return self.head_type in ("causal", "anticausal")

    def rope(self, seq_len: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions 0..seq_len-1, or (B, T, .) for each row's ``positions``."""
        if positions is not None:
            return self.rope_cos[positions], self.rope_sin[positions]
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def head_forward(self, i: int, x: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Head i's output before the shared norm: (B, T, D) -> (B, T, D). With ``cache`` (inference)
        the tokens sit at the cache's current positions and head i's keys and values are kept."""
        head = self.head_module(i)
        if not self.layout.heads_are_blocks:
            return head(x)
        if cache is None:
            return head(x, *self.rope(x.shape[1]))
        path = self.layout.head_path(i)
        return head(x, *self.rope(x.shape[1], cache[path].positions), cache[path])

    def head_outputs(self, trunk_hidden: torch.Tensor, cache: ModelCache | None = None) -> list[torch.Tensor]:
        """Every head's pre-norm output, head 0 first."""
        outs: list[torch.Tensor | None] = [None] * self.n_future
        x = trunk_hidden
        for i in self.head_order:
            outs[i] = self.head_forward(i, x, cache)
            if self.heads_are_chained:
                x = outs[i]
        return outs

    def extra_head_outputs(self, x: torch.Tensor, cache: ModelCache | None = None) -> list[torch.Tensor]:
        """Heads 2..n's pre-norm outputs from what the first of them reads: the trunk output, or
        head 1's output for causal heads (not anticausal: there head 1 reads head 2)."""
        if self.head_type == "anticausal":
            raise ValueError("anticausal heads run as one chain ending in head 1: use head_outputs")
        outs = []
        for i in range(1, self.n_future):
            outs.append(self.head_forward(i, x, cache))
            if self.heads_are_chained:
                x = outs[-1]
        return outs

    def logits(self, head_hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(head_hidden))

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
- replicated: no head layers; every head is the trunk output through ``norm`` and its own
  unembedding (paper Appendix B, "replicated unembeddings"; its byte-level models).

``model.mtp_kind=sequential`` (model/mtp_module.py): head 1 is the trunk output itself, depth k
(head k+1) reads depth k-1's output after its norm (``chain_value``) and the embedding of token
t+k (``embedded``, (D, B, T, dim)), and each depth has a norm of its own before ``output``.
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

    def head_module(self, i: int) -> nn.Module | None:
        """Head i (0-based: head 0 predicts t+1); None for the sequential kind's head 1."""
        path = self.layout.head_path(i)
        return None if path is None else self.get_submodule(path)

    def head_norm(self, i: int) -> nn.Module:
        """The norm before ``output`` for head i: the shared one, or a sequential depth's own."""
        return self.get_submodule(f"{self.layout.head_path(i)}.norm") if self.layout.sequential and i \
            else self.norm

    def unembedding(self, i: int) -> nn.Linear:
        """Head i's unembedding: the shared ``output``, or a replicated head's own."""
        return self.get_submodule(self.layout.unembedding_path(i))

    def head_params(self, i: int) -> list[nn.Parameter]:
        """Every parameter head i's loss depends on: its own, then its norm and its unembedding
        (sequential depths: the module, its norm inside it, then ``output``)."""
        own = list(self.head_module(i).parameters()) if self.head_module(i) is not None else []
        norm = [] if self.layout.sequential and i else [self.norm.weight]
        return own + norm + [self.unembedding(i).weight]

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
        return self.layout.sequential or self.head_type in ("causal", "anticausal")

    def chain_value(self, i: int, out: torch.Tensor) -> torch.Tensor:
        """What the next head in ``head_order`` reads of head i's output ``out``: ``out`` itself
        (causal, anticausal), or ``out`` after head i's norm (sequential)."""
        return self.head_norm(i)(out) if self.layout.sequential else out

    def rope(self, seq_len: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for positions 0..seq_len-1, or (B, T, .) for each row's ``positions``."""
        if positions is not None:
            return self.rope_cos[positions], self.rope_sin[positions]
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def head_forward(self, i: int, x: torch.Tensor, cache: ModelCache | None = None,
                     embedded: torch.Tensor | None = None) -> torch.Tensor:
        """Head i's output before its norm: (B, T, D) -> (B, T, D). With ``cache`` (inference) the
        tokens sit at the cache's current positions and head i's keys and values are kept. A
        sequential depth i also reads ``embedded`` (B, T, D): Emb(x_{t+i})."""
        head = self.head_module(i)
        if head is None:  # the sequential kind's head 1: the trunk output itself
            return x
        if not self.layout.heads_are_blocks and not self.layout.sequential:
            return head(x)
        path = f"{self.layout.head_path(i)}.block" if self.layout.sequential else self.layout.head_path(i)
        rope = self.rope(x.shape[1]) if cache is None else self.rope(x.shape[1], cache[path].positions)
        layer_cache = None if cache is None else cache[path]
        if self.layout.sequential:
            return head(embedded, x, *rope, layer_cache)
        return head(x, *rope, layer_cache)

    def head_outputs(self, trunk_hidden: torch.Tensor, cache: ModelCache | None = None,
                     embedded: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every head's output before its norm, head 0 first (``embedded``: (D, B, T, dim), the
        sequential depths' token embeddings)."""
        outs: list[torch.Tensor | None] = [None] * self.n_future
        x = trunk_hidden
        for i in self.head_order:
            outs[i] = self.head_forward(i, x, cache, self.depth_input(embedded, i))
            if self.heads_are_chained:
                x = self.chain_value(i, outs[i])
        return outs

    def depth_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Emb of (D, B, T) token ids: what the sequential depths read beside the hidden state (the
        host's ``tok_embeddings``: the whole model, or the first pipeline stage)."""
        return self.tok_embeddings(tokens)

    def depth_input(self, embedded: torch.Tensor | None, i: int) -> torch.Tensor | None:
        """Head i's slice of the sequential depths' embeddings (None for head 1 and parallel heads)."""
        return embedded[i - 1] if self.layout.sequential and i else None

    def extra_head_outputs(self, x: torch.Tensor, cache: ModelCache | None = None) -> list[torch.Tensor]:
        """Heads 2..n's pre-norm outputs from what the first of them reads: the trunk output, or
        head 1's output for causal heads (not anticausal: there head 1 reads head 2; nor the
        sequential kind: its depths read token embeddings too, see inference/sequential_drafts.py)."""
        if self.head_type == "anticausal" or self.layout.sequential:
            raise ValueError("anticausal heads and sequential depths draft through head_outputs / "
                             "their own chain, not extra_head_outputs")
        outs = []
        for i in range(1, self.n_future):
            outs.append(self.head_forward(i, x, cache))
            if self.heads_are_chained:
                x = outs[-1]
        return outs

    def logits(self, head_hidden: torch.Tensor, i: int = 0) -> torch.Tensor:
        """Head i's logits from its output before its norm."""
        return self.unembedding(i)(self.head_norm(i)(head_hidden))

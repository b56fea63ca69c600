"""The multi-token prediction model: a shared trunk, n_future heads, one shared unembedding.

Parameter-matched as in Gloeckle et al. (2024): ``n_layers=L, n_future=n`` gives L-n trunk layers
and n one-layer heads. Names follow Meta's released MTP checkpoints: the trunk and head 1 live in
``layers.*`` (head 1 is the last entry), heads 2..n in ``extra_heads.*``; ``norm`` and ``output``
are shared by every head. ``layers`` is a ModuleDict keyed "0", "1", ... so that a pipeline stage
can drop the layers it does not own and keep the original names (and checkpoints) intact.

Head types (``model.head_type``):
- transformer: every head reads the trunk output (the paper's default).
- linear: a full-depth trunk of L layers, each head a dim x dim linear map (paper ablation).
- causal: head 1 reads the trunk, head i reads head i-1's output (paper Appendix B).
- anticausal: head n reads the trunk, head i reads head i+1's output (paper Appendix B).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from megatrain.config import ModelConfig
from megatrain.model.transformer import TransformerBlock, rope_tables


def initial_value(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Parameter ``name``'s initial value (float32, CPU), a function of its name and the seed only.

    Any rank can therefore produce any parameter, or the shard of it that it holds, whatever the
    parallel layout: a model built on the meta device, sharded, then materialised starts from
    exactly the weights of a single-process run. Norm gains are 1; residual-branch outputs (wo,
    w2) get std / sqrt(2 * n_layers) (GPT-2 / Megatron), every other matrix ``init_std``.
    """
    if len(shape) == 1:
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / (2 * cfg.n_layers) ** 0.5
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


class MTPHeads:
    """The heads' interface the sequential-heads loss uses, shared by the whole model and the
    last pipeline stage. Needs ``head_type``, ``n_future``, ``head_module(i)`` and the RoPE
    buffers ``rope_cos`` / ``rope_sin``."""

    @property
    def head_order(self) -> list[int]:
        """The order heads are evaluated in; chained types feed each head the previous output."""
        order = list(range(self.n_future))
        return order[::-1] if self.head_type == "anticausal" else order

    @property
    def heads_are_chained(self) -> bool:
        return self.head_type in ("causal", "anticausal")

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def head_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Head i's output before the shared norm: (B, T, D) -> (B, T, D)."""
        head = self.head_module(i)
        if self.head_type == "linear":
            return head(x)
        return head(x, *self.rope(x.shape[1]))


class MTPTransformer(MTPHeads, nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int, seed: int = 0):
        super().__init__()
        self.seed = seed
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (from the dataset) before building")
        self.cfg = cfg
        self.n_future = cfg.n_future
        self.head_type = cfg.head_type
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.head_type == "linear":
            n_layer_entries, n_extra = cfg.n_layers, 0
            self.linear_heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False)
                                              for _ in range(cfg.n_future))
        else:
            n_layer_entries, n_extra = cfg.n_layers - cfg.n_future + 1, cfg.n_future - 1
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(n_layer_entries)})
        self.extra_heads = nn.ModuleList(TransformerBlock(cfg) for _ in range(n_extra))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---- structure -------------------------------------------------------------------------
    @property
    def trunk_layer_keys(self) -> list[str]:
        keys = list(self.layers.keys())
        return keys if self.head_type == "linear" else keys[:-1]

    def head_module(self, i: int) -> nn.Module:
        """Head i (0-based: head 0 predicts t+1)."""
        if self.head_type == "linear":
            return self.linear_heads[i]
        return self.layers[str(len(self.layers) - 1)] if i == 0 else self.extra_heads[i - 1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not p.is_meta:  # built on the meta device: materialize() fills it later
                    p.copy_(initial_value(name, p.shape, self.cfg, self.seed))

    # ---- forward ---------------------------------------------------------------------------
    def trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding and trunk layers: tokens (B, T) -> hidden (B, T, D)."""
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope(tokens.shape[1])
        for key in self.trunk_layer_keys:
            h = self.layers[key](h, cos, sin)
        return h

    def head_outputs(self, trunk_hidden: torch.Tensor) -> list[torch.Tensor]:
        """Every head's pre-norm output, head 0 first."""
        outs: list[torch.Tensor | None] = [None] * self.n_future
        x = trunk_hidden
        for i in self.head_order:
            outs[i] = self.head_forward(i, x)
            if self.heads_are_chained:
                x = outs[i]
        return outs

    def logits(self, head_hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(head_hidden))

    def forward(self, tokens: torch.Tensor, return_all_heads: bool = False) -> torch.Tensor:
        """Logits (B, T, V) of head 1, or (B, T, n_future, V) of every head for inference.

        Training does not call this: it runs the trunk and hands the heads to the sequential
        loss (megatrain.mtp_loss) so that only one head's logits exist at a time.
        """
        h = self.trunk(tokens)
        if not return_all_heads and not self.head_type == "anticausal":
            return self.logits(self.head_forward(0, h))
        outs = self.head_outputs(h)
        if not return_all_heads:
            return self.logits(outs[0])
        return self.logits(torch.stack(outs, dim=-2))  # (B, T, n, V)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

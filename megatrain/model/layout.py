"""Where each part of an MTPTransformer lives: the one description every other module asks.

Names follow Meta's released multi-token-prediction checkpoints. For ``n_layers=L, n_future=n``
(parameter-matched, Gloeckle et al. 2024) the model has L-n trunk layers and n one-layer heads:

    tok_embeddings                  the embedding
    layers.0 .. layers.{L-n-1}      the trunk
    layers.{L-n}                    head 1 (predicts t+1): the last entry of ``layers``
    extra_heads.0 .. .{n-2}         heads 2..n
    norm, output                    shared by every head (SHARED_BY_HEADS)

``head_type=linear`` (paper ablation) keeps a full-depth trunk of L layers and puts its heads, dim x
dim maps, in ``linear_heads.0 .. .{n-1}``. ``layers`` is keyed "0", "1", ... so that a pipeline
stage can hold a subset of it under the original names (and load any checkpoint).

``head_type=replicated`` (the paper's "replicated unembeddings", used for its byte-level models)
keeps a full-depth trunk of L layers and has no head layers: every head reads the trunk output
through ``norm``; head 1 is unembedded by ``output``, head i by ``extra_outputs.{i-2}`` (a dim x
vocab matrix each).

``mtp_kind=sequential`` (DeepSeek-V3's MTP modules) keeps the full trunk ``layers.0 .. .{L-1}``:
head 1 is the trunk's own output through ``norm`` and ``output`` (no layer of its own), and the
D = n - 1 depths are ``mtp.0 .. mtp.{D-1}`` (``MTPModule``: enorm, hnorm, eh_proj, block, norm),
added on top, with the embedding and ``output`` shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain.config import ModelConfig

SHARED_BY_HEADS = ("norm", "output")


@dataclass(frozen=True)
class LayerLayout:
    head_type: str
    n_future: int
    n_trunk_layers: int
    sequential: bool = False  # model.mtp_kind=sequential

    @classmethod
    def of(cls, cfg: ModelConfig) -> LayerLayout:
        sequential = cfg.mtp_kind == "sequential"
        full_trunk = sequential or cfg.head_type in ("linear", "replicated")
        n_trunk = cfg.n_layers if full_trunk else cfg.n_layers - cfg.n_future
        return cls(cfg.head_type, cfg.n_future, n_trunk, sequential)

    @property
    def heads_are_blocks(self) -> bool:
        """Transformer-block heads (sharded like trunk layers), not dim x dim linear maps, nor the
        sequential kind's modules."""
        return self.head_type not in ("linear", "replicated") and not self.sequential

    @property
    def replicated(self) -> bool:
        """One unembedding per head and no head layers (head_type=replicated)."""
        return self.head_type == "replicated" and not self.sequential

    def unembedding_path(self, i: int) -> str:
        """The unembedding of head i: ``output``, or ``extra_outputs.{i-1}`` for replicated heads."""
        if not 0 <= i < self.n_future:
            raise IndexError(f"head {i} of a model with n_future={self.n_future}")
        return f"extra_outputs.{i - 1}" if self.replicated and i else "output"

    @property
    def n_depths(self) -> int:
        """Sequential MTP modules (0 for parallel heads)."""
        return self.n_future - 1 if self.sequential else 0

    @property
    def trunk_keys(self) -> list[str]:
        """Keys of ``layers`` that are trunk layers, first to last."""
        return [str(k) for k in range(self.n_trunk_layers)]

    @property
    def head1_key(self) -> str | None:
        """The key of ``layers`` that holds head 1 (None for linear heads)."""
        return str(self.n_trunk_layers) if self.heads_are_blocks else None

    @property
    def layer_keys(self) -> list[str]:
        """Every key of ``layers``: the trunk, then head 1."""
        return self.trunk_keys + ([self.head1_key] if self.head1_key else [])

    @property
    def head_containers(self) -> list[str]:
        """Top-level modules that hold heads besides ``layers`` (head 1's home)."""
        if self.sequential:
            return ["mtp"] if self.n_depths else []
        if self.replicated:
            return ["extra_outputs"] if self.n_future > 1 else []
        return ["extra_heads"] if self.heads_are_blocks else ["linear_heads"]

    def head_path(self, i: int) -> str | None:
        """Module path of head i (0-based: head 0 predicts t+1), e.g. ``extra_heads.1``; None for
        the sequential kind's head 1 and for replicated heads (the trunk output itself)."""
        if not 0 <= i < self.n_future:
            raise IndexError(f"head {i} of a model with n_future={self.n_future}")
        if self.replicated:
            return None
        if self.sequential:
            return None if i == 0 else f"mtp.{i - 1}"
        if not self.heads_are_blocks:
            return f"linear_heads.{i}"
        return f"layers.{self.head1_key}" if i == 0 else f"extra_heads.{i - 1}"

    @property
    def extra_unembedding_paths(self) -> list[str]:
        """The replicated heads' own unembeddings (heads 2..n), besides the shared ``output``."""
        return [self.unembedding_path(i) for i in range(1, self.n_future)] if self.replicated else []

    @property
    def head_paths(self) -> list[str]:
        """The module paths of the heads that have a module (all but the sequential kind's head 1)."""
        return [p for i in range(self.n_future) if (p := self.head_path(i)) is not None]

    @property
    def attention_paths(self) -> list[str]:
        """Modules that hold an attention layer besides the trunk (KV caches, TP plans): the
        block heads, or the sequential modules' blocks."""
        if self.sequential:
            return [f"mtp.{k}.block" for k in range(self.n_depths)]
        return self.head_paths if self.heads_are_blocks else []

"""Measure one piece of the training step by running megatrain's own code on fake tensors.

``FakeTensorMode`` runs every operator for its shapes and dtypes only, so a 13B layer costs no
memory and milliseconds; ``LiveBytes`` (the memory profiler's counter) counts the bytes of every
storage an operator creates and, through a finalizer on the storage, when it dies. Together
they give the exact live-bytes curve of a trunk layer's forward and backward and of the
sequential-heads node, at the shapes one rank sees (tensor-parallel linears are built at their
local size), without a GPU and without re-deriving what autograd keeps: whatever the model code
saves is what gets counted. The planner (memory_model.py) composes these pieces with the
layout's arithmetic.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from megatrain.config import ModelConfig
from megatrain.model.transformer import TransformerBlock, model_rope_tables
from megatrain.planning.shards import chunk_size
from megatrain.profiling.live_bytes import LiveBytes


def shard_linears(block: nn.Module, tp: int) -> nn.Module:
    """A transformer block as tensor-parallel rank 0 holds it: column-parallel projections keep
    their first output chunk, row-parallel ones their first input chunk (parallel/tensor_parallel.py)."""
    if tp == 1:
        return block
    attention, ffn = block.attention, block.feed_forward
    for parent, name, dim in ((attention, "wq", 0), (attention, "wk", 0), (attention, "wv", 0),
                              (attention, "wo", 1), (ffn, "w1", 0), (ffn, "w3", 0), (ffn, "w2", 1)):
        linear = getattr(parent, name)
        out_f, in_f = linear.weight.shape
        if dim == 0:
            out_f = chunk_size(out_f, tp, 0)
        else:
            in_f = chunk_size(in_f, tp, 0)
        setattr(parent, name, nn.Linear(in_f, out_f, bias=False))
    return block


class _FirstInputSlice(nn.Module):
    """A row-parallel linear as tensor-parallel rank 0 runs it on a replicated input: its first
    chunk of the input features times its slice of the weight (the partial sums' all-reduce
    allocates an output of the same shape)."""

    def __init__(self, linear: nn.Linear, tp: int):
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.width = chunk_size(in_f, tp, 0)
        self.weight = nn.Parameter(torch.empty(out_f, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x[..., :self.width], self.weight)


@dataclass(frozen=True)
class LayerMemory:
    """One trunk layer's memory per microbatch (bytes)."""

    kept: int  # what its forward leaves alive until its backward (saved tensors and its output)
    forward_extra: int  # transient peak above ``kept`` during its forward
    backward_extra: int  # transient peak during its backward above what was alive before it
    sequence_local: int  # of ``kept``: tensors shaped like the residual stream, (B, T, D) or
    # (B, T, 1) - the norms' inputs, outputs and statistics and the layer's output - which
    # sequence parallelism shards over tp (everything between the norms is gathered)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """Build modules in ``dtype`` (``Module.to`` cannot swap a fake tensor's parameters)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def trace_layer(cfg: ModelConfig, batch: int, seq: int, tp: int = 1,
                autocast_dtype: torch.dtype | None = None, checkpointed: bool = False,
                param_dtype: torch.dtype | None = None) -> LayerMemory:
    """Run one trunk layer's forward and backward on fake tensors; see ``LayerMemory``.

    ``param_dtype``: the dtype the layer's weights are in while it computes (FSDP2's
    mixed-precision compute copy); default float32, which autocast casts per forward.
    """
    with FakeTensorMode():
        with _default_dtype(param_dtype):
            block = shard_linears(TransformerBlock(cfg), tp)
        if checkpointed:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        cos, sin = model_rope_tables(cfg, seq)
        # the residual stream is in the weights' dtype (FSDP's bf16 compute copies make the
        # embedding's output bf16), float32 otherwise
        x = torch.randn(batch, seq, cfg.dim, dtype=param_dtype or torch.float32, requires_grad=True)
        residual_shaped: dict[int, int] = {}

        def note(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape[:2]) == (batch, seq) and t.dim() == 3 and t.shape[2] in (cfg.dim, 1):
                storage = t.untyped_storage()
                residual_shaped[storage._cdata] = storage.nbytes()
            return t

        # A norm's output feeds the projections, which under sequence parallelism save the
        # all-gathered copy instead: full length, so not sequence-local.
        norm_outputs: set[int] = set()
        for norm in _norms(block):
            norm.register_forward_hook(lambda _m, _i, out: norm_outputs.add(out.untyped_storage()._cdata))
        counter = LiveBytes()
        with counter:
            before = counter.reset_peak()
            with _autocast(autocast_dtype), torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
                y = block(x, cos, sin)
            kept = counter.now - before
            forward_extra = counter.peak - counter.now
            for key in (x.untyped_storage()._cdata, *norm_outputs):  # x: the previous layer's output
                residual_shaped.pop(key, None)
            sequence_local = sum(residual_shaped.values()) + y.untyped_storage().nbytes()
            grad_out = torch.ones_like(y)
            start = counter.reset_peak()
            y.backward(grad_out)
            backward_extra = counter.peak - start
            del y, grad_out
    return LayerMemory(kept, forward_extra, backward_extra, sequence_local)


@contextlib.contextmanager
def _ends_of_row_loop():
    """Run the chunked cross-entropy's row loop for its first and last chunk only.

    Every iteration allocates and frees the same chunk-sized temporaries into buffers allocated
    before the loop, so the first iteration reaches the loop's peak and the last (possibly
    shorter) one its end state; the ones between repeat them. Fake tensors cost about a
    millisecond an operator: at 8192 rows and V=32000 the full loop took over a minute per plan.
    """
    from megatrain.kernels import torch_reference

    every_chunk = torch_reference._row_chunks

    def ends(n_rows, vocab):
        chunks = list(every_chunk(n_rows, vocab))
        return chunks[:1] + chunks[1:][-1:]

    torch_reference._row_chunks = ends
    try:
        yield
    finally:
        torch_reference._row_chunks = every_chunk


def _norms(block: nn.Module) -> list[nn.Module]:
    inner = getattr(block, "_checkpoint_wrapped_module", block)
    return [inner.attention_norm, inner.ffn_norm]


@dataclass(frozen=True)
class HeadsMemory:
    """The sequential-heads node of one microbatch (bytes), at one rank's shapes, with the head
    gradient sink of the layout (megatrain.head_grads)."""

    peak: int  # highest live bytes during its forward (every head's forward, CE and backward)
    peak_next: int  # the same for a node whose step's set of head gradients already exists
    held: int  # what it keeps from its forward to its backward (trunk gradient; per_node: + the set)
    head_set: int  # one set of the head parameters' gradients (direct: in .grad; shared: pending)
    backward_peak: int  # highest live bytes during its backward, which hands out the gradients
    after_backward: int  # the head parameters' .grad and the trunk gradient left afterwards


def trace_heads(cfg: ModelConfig, batch: int, seq: int, tp: int = 1,
                autocast_dtype: torch.dtype | None = None,
                param_dtype: torch.dtype | None = None, sink_mode: str = "per_node") -> HeadsMemory:
    """Run ``mtp_loss`` forward and backward of the heads alone on fake tensors: two
    microbatches' nodes with one sink (what the second finds already there), then a backward.

    The model is built with no trunk layers (the heads, ``norm`` and ``output``; tensor-parallel
    rank 0's slices of them), so the node runs exactly the code the last stage runs.
    """
    from megatrain.head_grads import HeadGradSink
    from megatrain.model.mtp import MTPTransformer
    from megatrain.mtp_loss import build_head_targets, mtp_loss

    heads_only = copy.deepcopy(cfg)
    heads_only.n_layers = cfg.n_future if cfg.head_type not in ("linear", "replicated") else 0
    with FakeTensorMode(allow_non_fake_inputs=True), _default_dtype(param_dtype), _ends_of_row_loop():
        model = MTPTransformer(heads_only, max_seq_len=seq)
        if tp > 1:
            for i in range(model.n_future):
                if model.layout.heads_are_blocks:
                    shard_linears(model.head_module(i), tp)
            # the sequential kind's modules: their blocks shard like a trunk block's; eh_proj is
            # row-parallel over its replicated input: rank 0 multiplies the first slice of it
            for module in getattr(model, "mtp", []):
                shard_linears(module.block, tp)
                module.eh_proj = _FirstInputSlice(module.eh_proj, tp)
            model.output = nn.Linear(cfg.dim, chunk_size(cfg.vocab_size, tp, 0), bias=False)
            for k in range(len(getattr(model, "extra_outputs", []))):  # replicated heads' own
                model.extra_outputs[k] = nn.Linear(cfg.dim, chunk_size(cfg.vocab_size, tp, 0), bias=False)
        window = torch.randint(0, max(chunk_size(cfg.vocab_size, tp, 0), 1), (batch, seq + 1))
        targets = build_head_targets(window, cfg.n_future)
        scales = torch.full((cfg.n_future,), 1.0 / (batch * seq))
        head_set = sum(p.numel() * p.element_size() for p in model.all_head_params())
        counter = LiveBytes()
        with counter:
            # two microbatches' forwards into one sink: the second finds the step's set there
            sink, nodes, totals = HeadGradSink(sink_mode), [], []
            for _ in range(2):
                hidden = torch.randn(batch, seq, cfg.dim, requires_grad=True)  # the residual's dtype
                start = counter.reset_peak()
                with _autocast(autocast_dtype):
                    totals.append(mtp_loss(model, hidden, targets, scales, sink=sink)[0])
                nodes.append((counter.peak - start, counter.now - start))
            (peak, kept), (peak_next, _) = nodes
            held = kept - (head_set if sink_mode != "per_node" else 0)
            del totals, sink, hidden
            model.zero_grad(set_to_none=True)
            # one microbatch's forward and backward, from nothing
            hidden = torch.randn(batch, seq, cfg.dim, requires_grad=True)
            start = counter.now
            with _autocast(autocast_dtype):
                total, _ = mtp_loss(model, hidden, targets, scales, sink=HeadGradSink(sink_mode))
            counter.reset_peak()
            total.backward()
            backward_peak = counter.peak - start
            after = counter.now - start
    return HeadsMemory(peak, peak_next, held, head_set, backward_peak, after)

"""Pipeline parallelism: cut MTPTransformer into stages and run them with torch.distributed.pipelining.

Which stage holds which layers is ``pipeline_layout``'s to decide; this module builds the stages
and the schedule.
- The LAST stage holds every MTP head with ``norm`` and ``output`` and runs the loss: its forward
  returns the 0-dim loss of the sequential-heads node (megatrain.mtp_loss), so the heads' logits
  never cross a pipeline boundary and only one head's logits exist at a time.
- A stage keeps the original parameter names (``layers.7.attention.wq.weight``): unowned entries
  are simply absent from its ``layers`` ModuleDict, so DCP checkpoints reshard between layouts.
- Sequential MTP modules (model.mtp_kind=sequential) read Emb(x_{t+k}) beside the hidden state,
  and only the first stage holds the embedding: it looks the D depths' tokens up and every stage
  hands them on with the hidden state, to the last stage's loss node (``embedded``), whose gradient
  comes back the same way to the embedding: exactly one process's gradient, and no second copy of
  the embedding table on the last stage (what it costs instead: D * B * T * dim activations per
  microbatch in flight, and that much more to send between stages; ``megatrain plan`` counts it).

The loss of microbatch m is already normalised by the global batch (mtp_loss.head_scales), so
the schedules run with ``scale_grads=False``: gradients are summed over microbatches, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatrain.head_grads import HeadGradSink
from megatrain.model.heads import MTPHeads
from megatrain.model.layout import SHARED_BY_HEADS
from megatrain.mtp_loss import depth_token_ids, mtp_loss
from megatrain.profiling.phases import phase, phase_context

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved_1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}


class MTPStage(MTPHeads, nn.Module):
    """One pipeline stage of an MTPTransformer, with the model's parameter names.

    ``forward(x, embedded=None, targets=...)``: x is tokens (B, T) on the first stage, the hidden
    state (B, T, D) elsewhere; ``embedded`` the sequential depths' token embeddings (D, B, T, dim)
    a previous stage looked up (None on the first stage and for parallel heads); ``targets``
    (B, n_future, T) reaches every stage (it sizes RoPE) and is used on the last, which returns the
    summed, scaled MTP loss of the microbatch and appends its HeadStats to ``self.stats``.
    ``head_scales`` is set by the runtime before each step.
    With one stage (pp=1) the same module runs the whole model: FSDP's hooks need ``forward``.
    """

    def __init__(self, model: nn.Module, stage_index: int, n_stages: int, trunk_keys: list[str],
                 ignore_index: int = -100, impl: str = "auto"):
        super().__init__()
        self.cfg, self.layout = model.cfg, model.layout
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        self.holds_heads = self.is_last
        self.trunk_keys = list(trunk_keys)
        self.ignore_index, self.impl = ignore_index, impl
        if self.is_first:
            self.tok_embeddings = model.tok_embeddings
        head1 = [self.layout.head1_key] if self.is_last and self.layout.head1_key else []
        self.layers = nn.ModuleDict({k: model.layers[k] for k in self.trunk_keys + head1})
        if self.is_last:
            for name in (*self.layout.head_containers, *SHARED_BY_HEADS):
                setattr(self, name, getattr(model, name))
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.sequence_parallel_mesh: DeviceMesh | None = None  # set by apply_tp(sequence_parallel=True)
        self.head_scales: torch.Tensor | None = None
        # where the head parameters' gradients go (megatrain.head_grads); parallelize sets the
        # mode its layout allows
        self.head_grad_sink = HeadGradSink("per_node")
        self.stats: list = []
        # the last stage's loss; `megatrain profile memory --compare-naive` swaps in the all-logits one
        self.loss_fn = mtp_loss

    def forward(self, x: torch.Tensor, embedded: torch.Tensor | None = None,
                targets: torch.Tensor | None = None):
        # The sequence length comes from the targets: under sequence parallelism the hidden state
        # between stages is a sequence shard (B, T/tp, D).
        with phase("trunk.forward"):
            cos, sin = self.rope(targets.shape[-1])
            if self.is_first:
                h = self.tok_embeddings(x)
                embedded = self._depth_embeddings(targets) if self.layout.n_depths else None
            else:
                h = x
            for key in self.trunk_keys:
                h = self.layers[key](h, cos, sin)
            if not self.is_last:  # the input tensor itself: a view would break the zero-bubble
                return h if embedded is None else (h, embedded)  # schedules' in-place detach
            if self.sequence_parallel_mesh is not None:
                h = gather_sequence(h, self.sequence_parallel_mesh)  # (B, T/tp, D) -> (B, T, D)
            if embedded is not None:
                embedded = self._full_sequence(embedded)
        loss, stats = self.loss_fn(self, h, targets.transpose(0, 1), self.head_scales,
                                   self.ignore_index, self.impl, sink=self.head_grad_sink,
                                   embedded=embedded)
        self.stats.append(stats)
        return loss

    def _depth_embeddings(self, targets: torch.Tensor) -> torch.Tensor:
        """Emb(x_{t+k}) for the D depths, (D, B, T', dim): T' = T/tp under sequence parallelism
        (the vocab-parallel embedding's output is then a sequence shard, like the hidden's)."""
        ids = depth_token_ids(targets[:, 0], self.layout.n_depths)  # (D, B, T) from x_{t+1}
        looked_up = self.tok_embeddings(ids.flatten(0, 1))  # (D*B, T', dim)
        return looked_up.unflatten(0, ids.shape[:2])

    def _full_sequence(self, embedded: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel_mesh is None:
            return embedded
        full = gather_sequence(embedded.flatten(0, 1), self.sequence_parallel_mesh)
        return full.unflatten(0, embedded.shape[:2])


def gather_sequence(h: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """All-gather a sequence-parallel activation. Its gradient comes back replicated (the heads'
    and the vocab-parallel CE's input gradients are all-reduced over tp), so the backward is
    just this rank's slice."""
    return DTensor.from_local(h, tp_mesh, [Shard(1)]).redistribute(tp_mesh, [Replicate()]).to_local()


def split_model(model: nn.Module, stage_layers: list[int], stage_ids: list[int],
                ignore_index: int = -100, impl: str = "auto") -> list[MTPStage]:
    """The MTPStage modules for ``stage_ids`` (this rank's), cut by ``stage_layers``.

    Each stage shares no module with another: with several stages per rank the model is copied
    first (modules of other stages are dropped with the copy).
    """
    n_stages = len(stage_layers)
    trunk = model.layout.trunk_keys
    bounds = [0]
    for count in stage_layers:
        bounds.append(bounds[-1] + count)
    stages = []
    for n, sid in enumerate(stage_ids):
        source = model if n == len(stage_ids) - 1 else copy.deepcopy(model)
        stages.append(MTPStage(source, sid, n_stages, trunk[bounds[sid]:bounds[sid + 1]],
                               ignore_index, impl))
    return stages


# ---- the schedule --------------------------------------------------------------------------------
def _loss_is_output(output, _target):
    """The last stage already returns the microbatch loss (the sequential-heads node)."""
    return output


class PhasedPipelineStage(PipelineStage):
    """A PipelineStage that tells the memory profiler (megatrain.profiling.phases) which stage and
    microbatch each schedule action runs, and marks its backward as ``trunk.backward``. The stage's
    own forward marks ``trunk.forward`` and the heads' phases. Nothing changes when no profiler runs."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        with phase_context(stage=self.stage_index, microbatch=fwd_chunk_id):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with phase_context(stage=self.stage_index, microbatch=bwd_chunk_id), phase("trunk.backward"):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with phase_context(stage=self.stage_index, microbatch=bwd_chunk_id), phase("trunk.backward"):
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)

    def _forward_metadata_inference(self, *args, **kwargs):
        # The schedule's first step runs the stage once on uninitialised inputs to learn shapes,
        # with gradients on, and then only an input-gradient pass: that node's head gradients
        # must not reach .grad or the step's shared set, so it gets a sink of its own.
        step_sink, self.submod.head_grad_sink = self.submod.head_grad_sink, HeadGradSink("per_node")
        try:
            return super()._forward_metadata_inference(*args, **kwargs)
        finally:
            self.submod.head_grad_sink = step_sink


def build_schedule(stages: list[MTPStage], pp_mesh: DeviceMesh, schedule: str, n_microbatches: int,
                   device: torch.device):
    group = pp_mesh.get_group()
    pipeline_stages = [PhasedPipelineStage(s, s.stage_index, s.n_stages, device, group=group)
                       for s in stages]
    cls = SCHEDULES[schedule]
    if cls in (ScheduleGPipe, Schedule1F1B):
        return cls(pipeline_stages[0], n_microbatches, loss_fn=_loss_is_output, scale_grads=False)
    return cls(pipeline_stages, n_microbatches, loss_fn=_loss_is_output, scale_grads=False)

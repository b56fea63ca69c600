"""Predicted peak memory of every rank of a layout, with what it is made of.

For one rank the step is replayed action by action - each microbatch's forward on each of the
rank's stages (with the sequential-heads node on the last one), each backward, then the optimizer
step (schedules.py gives the order) - and the live bytes at each moment are a sum of named parts:

- persistent: this rank's parameter shards (shards.py: exactly the elements our parallelisation
  gives it), AdamW's two moments (+ its step counters), ZeRO's master partition and buckets;
  gradients from the step's first backward on;
- FSDP2 compute copies: the root unit (embedding, heads, norm, unembedding) stays all-gathered
  from forward to backward; a trunk layer is gathered while it runs (two in backward, with the
  prefetch), or every layer of the stage under pipelining (reshard_after_forward=False);
- activations: what the stage's trunk layers keep per microbatch (trace.py runs the real block on
  fake tensors at this rank's shapes, with checkpointing and autocast as configured; sequence
  parallelism shards the residual-stream part), times the microbatches the stage holds at that
  moment;
- the heads (last stage only): the node's peak during a forward, what it holds until its
  backward for every microbatch still waiting (trace.py runs ``mtp_loss`` of the real heads);
- the batch: token ids and the n_future target rows (int64).

Everything is bytes of allocated tensors (the CPU's exact count, or CUDA's ``memory_allocated``).
On CUDA ``with_allowance`` adds what the caching allocator reserves beyond that and the CUDA
context, and the total is compared with the device's memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from megatrain.config import Config
from megatrain.model.layout import LayerLayout
from megatrain.parallel.parallelize import head_grad_mode
from megatrain.parallel.pipeline_layout import stages_per_rank
from megatrain.planning.schedules import occupancy, rank_actions
from megatrain.planning.shards import (
    LocalParameter,
    local_parameters,
    model_shapes,
    rank_coords,
    stage_trunk_layers,
    stages_of_rank,
)
from megatrain.planning.trace import HeadsMemory, LayerMemory, trace_heads, trace_layer
from megatrain.spec import RunSpec

FP32 = 4
INT64 = 8
CUDA_CONTEXT_BYTES = 1 << 30  # CUDA context, cuBLAS/NCCL workspaces: outside memory_allocated
CUDA_FRAGMENTATION = 0.05  # what the caching allocator reserves beyond what is allocated


@dataclass
class RankPlan:
    rank: int
    stages: list[int]
    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]  # the parts live at the peak, bytes
    phases: dict[str, int] = field(default_factory=dict)  # predicted peak of each phase


@dataclass(frozen=True)
class Target:
    """What the plan is for: the device type decides the compute dtypes."""

    device: str  # "cuda" | "cpu"
    autocast: torch.dtype | None
    fsdp_param_dtype: torch.dtype | None


def target_of(cfg: Config) -> Target:
    device = "cpu" if cfg.train.device == "cpu" else "cuda"
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    autocast = torch.bfloat16 if dtype == "bf16" else None
    fsdp = torch.bfloat16 if device == "cuda" and cfg.parallel.dp > 1 else None
    return Target(device, autocast, fsdp)


def _bytes_of(dtype: torch.dtype | None) -> int:
    return FP32 if dtype is None else torch.empty((), dtype=dtype).element_size()


@lru_cache(maxsize=64)
def _layer(model_key, batch, seq, tp, autocast, checkpointed, param_dtype) -> LayerMemory:
    return trace_layer(model_key.cfg, batch, seq, tp, autocast, checkpointed, param_dtype)


@lru_cache(maxsize=64)
def _heads(model_key, batch, seq, tp, autocast, param_dtype, sink_mode) -> HeadsMemory:
    return trace_heads(model_key.cfg, batch, seq, tp, autocast, param_dtype, sink_mode)


class _ModelKey:
    """Hashable wrapper of a ModelConfig for the trace caches (equal configs, equal keys)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._key = repr(cfg)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _ModelKey) and self._key == other._key


class _Ledger:
    """Live parts of one rank through the step; records each phase's peak and the parts at the peak."""

    def __init__(self):
        self.parts: dict[str, int] = {}
        self.phases: dict[str, int] = {}
        self.peak, self.peak_phase, self.at_peak = 0, "", {}

    def set(self, name: str, value: int) -> None:
        if value:
            self.parts[name] = int(value)
        else:
            self.parts.pop(name, None)

    def add(self, name: str, value: int) -> None:
        self.set(name, self.parts.get(name, 0) + value)

    def mark(self, phase: str, transient: dict[str, int] | None = None) -> None:
        """The parts now, plus ``transient`` ones that exist only inside ``phase``."""
        live = dict(self.parts)
        for name, value in (transient or {}).items():
            if value:
                live[name] = live.get(name, 0) + int(value)
        total = sum(live.values())
        self.phases[phase] = max(self.phases.get(phase, 0), total)
        if total > self.peak:
            self.peak, self.peak_phase, self.at_peak = total, phase, live


def plan_rank(spec: RunSpec, rank: int, shapes: dict | None = None) -> RankPlan:
    """The predicted memory of ``rank`` in the resolved layout ``spec``."""
    cfg = spec.config
    p, model = cfg.parallel, cfg.model
    target = target_of(cfg)
    coords = rank_coords(rank, p.dp, p.pp, p.tp)
    shapes = shapes if shapes is not None else model_shapes(cfg)
    held = local_parameters(cfg, rank, shapes)
    my_stages = stages_of_rank(cfg, coords.pp_rank)
    layers_per_stage = stage_trunk_layers(cfg)
    last_stage = len(layers_per_stage) - 1
    micro, n_micro = spec.micro_batch, spec.forwards_per_step
    seq = cfg.data.seq_len
    tp = p.tp
    key = _ModelKey(model)
    compute = _bytes_of(target.fsdp_param_dtype)
    fsdp = p.dp > 1 and p.dp_engine == "fsdp"
    deepspeed = p.dp > 1 and p.dp_engine == "deepspeed"

    ledger = _Ledger()
    grads = _persistent(ledger, held, p, deepspeed, target, LayerLayout.of(model).trunk_keys)
    local_batch = spec.local_batch
    ledger.set("batch (token ids and targets)",
               local_batch * (seq + 1) * INT64 + model.n_future * local_batch * seq * INT64)

    # ---- FSDP compute copies ------------------------------------------------------------------
    trunk_names = tuple(f"layers.{k}." for k in LayerLayout.of(model).trunk_keys)
    root = [x for x in held if not x.name.startswith(trunk_names)]
    trunk = [x for x in held if x.name.startswith(trunk_names)]
    one_layer_gathered = _largest_layer(trunk) * compute
    if fsdp:
        ledger.set("fsdp: gathered root unit (embedding, heads, norm, output)",
                   sum(x.gathered_numel for x in root) * compute)
        if p.pp > 1:  # reshard_after_forward=False: every layer stays gathered until its backward
            ledger.set("fsdp: gathered trunk layers", sum(x.gathered_numel for x in trunk) * compute)
    forward_gathering = {"fsdp: gathering one trunk layer": one_layer_gathered} if fsdp and p.pp == 1 else {}
    backward_gathering = ({"fsdp: gathering two trunk layers and one layer's full gradient":
                           3 * one_layer_gathered * FP32 // max(compute, 1)} if fsdp and p.pp == 1 else {})

    # ---- per stage: activations of one microbatch, the backward's transient ----------------------
    kept, backward_extra = {}, {}
    for stage in my_stages:
        count = layers_per_stage[stage]
        kept[stage] = _stage_layer_bytes(cfg, key, micro, seq, target, count)
        backward_extra[stage] = 0
        if count:
            layer = _layer(key, micro, seq, tp, target.autocast, p.activation_checkpointing == "full",
                           target.fsdp_param_dtype)
            backward_extra[stage] = layer.backward_extra
    sink_mode = head_grad_mode(p)
    heads = (_heads(key, micro, seq, tp, target.autocast, target.fsdp_param_dtype, sink_mode)
             if last_stage in my_stages else None)
    gathered_output = micro * seq * model.dim * FP32 if p.sequence_parallel and tp > 1 else 0
    # Sequential MTP under pipelining: the depths' token embeddings (D, micro, T, dim, float32; a
    # sequence shard under SP) travel with the hidden state and are held with it on every stage
    # (parallel/pipeline.py), instead of a copy of the embedding table on the last stage.
    layout = LayerLayout.of(model)
    handed = (layout.n_depths * micro * (seq // (tp if p.sequence_parallel else 1)) * model.dim * FP32
              if layout.sequential and p.pp > 1 else 0)

    # ---- the step: replay this rank's forwards and backwards ----------------------------------
    actions = rank_actions(p.pp_schedule, p.pp, coords.pp_rank, n_micro,
                           stages_per_rank(p.pp_schedule, p.virtual_stages))
    # The step's set of head gradients (megatrain.head_grads) outside "gradients": direct mode
    # writes it into .grad from the first heads forward on; shared mode keeps one pending from a
    # heads forward to the next heads backward; per_node counts it in each node's "held".
    head_set_live = False
    for moment in occupancy(actions):
        action = moment.action
        ledger.set("gradients (fp32)", grads if moment.gradients else 0)
        ledger.set("activations: trunk layers", sum(kept[s] * n for s, n in moment.holding.items()))
        ledger.set("activations: the depths' token embeddings, handed between stages",
                   handed * sum(moment.holding.values()))
        waiting = moment.holding.get(last_stage, 0)
        on_heads = heads is not None and action.stage == last_stage
        if heads is not None:  # every microbatch between its node's forward and backward
            ledger.set("heads: held by waiting microbatches until their backward",
                       heads.held * max(waiting - (1 if on_heads else 0), 0))
            in_grads = sink_mode == "direct" and moment.gradients
            ledger.set(f"heads: the step's head gradients ({sink_mode})",
                       heads.head_set if head_set_live and not in_grads else 0)
        if action.kind == "F":
            ledger.mark("trunk.forward", forward_gathering)
            if on_heads:
                node = {"heads: the node of one microbatch": heads.peak_next if head_set_live else heads.peak,
                        "heads: the trunk output gathered over the sequence": gathered_output}
                ledger.mark("heads", node)
                head_set_live = sink_mode != "per_node"
            continue
        transient = {**backward_gathering}
        if on_heads:
            # (the set itself is on its own line, or in "gradients", except per_node's)
            own_set = heads.head_set if sink_mode != "per_node" else 0
            ledger.mark("heads.backward",
                        {"heads: the node of one microbatch": heads.backward_peak - own_set})
            if sink_mode == "shared":  # handed out to .grad (zero bubble: by the weight pass,
                # which torch's programs run right after the last stage's input pass, and which
                # occupancy() yields no moment for)
                head_set_live = False
                ledger.set("heads: the step's head gradients (shared)", 0)
            if not moment.gradients:  # its gradients are the first .grad: not in "gradients" yet
                transient["heads: head gradients and trunk gradient after the node"] = (
                    heads.after_backward - (heads.head_set if sink_mode == "direct" else 0))
        extra = backward_extra[action.stage]
        if action.kind == "I" and action.stage != 0:
            # Zero-bubble backward: the input-gradient pass keeps what the deferred weight-gradient
            # pass needs, about one microbatch's activations of the stage. (The first stage's input
            # is token ids: it has no input gradient, its weight pass is the whole backward.)
            extra += kept[action.stage]
        transient["activations: one layer's backward"] = extra
        ledger.mark("trunk.backward", transient)
    # after every backward: activations gone, gradients complete, FSDP buffers resharded
    for name in list(ledger.parts):
        if name.startswith(("activations", "heads", "fsdp: gathered")):
            ledger.set(name, 0)
    ledger.set("gradients (fp32)", grads)
    ledger.mark("optimizer.step", {"optimizer: temporaries": _largest_param(held) * FP32 * 2})
    return RankPlan(rank, my_stages, ledger.peak, ledger.peak_phase, ledger.at_peak, ledger.phases)


def _persistent(ledger: _Ledger, held: list[LocalParameter], p, deepspeed: bool, target: Target,
                trunk_keys: list[str]) -> int:
    """Parameter shards and AdamW state of this rank; returns the bytes of its gradients, which
    exist from the first backward of a step to the optimizer's zero_grad (set to None)."""
    local = sum(x.local_numel for x in held)
    allocated = sum(x.allocated_numel for x in held)
    if not deepspeed:
        ledger.set("parameters (fp32)", allocated * FP32)
        ledger.set("optimizer: AdamW moments", 2 * local * FP32 + len(held) * FP32)
        return local * FP32
    from megatrain.parallel.deepspeed_engine import bucket_elements

    full = sum(x.gathered_numel for x in held)
    partition = math.ceil(full / p.dp)
    # ZeRO keeps an fp32 master copy of its partition and partitions the moments (stage >= 1),
    # the gradients (>= 2) and the parameters themselves (3); its gradient reduce bucket
    # (deepspeed_engine.bucket_elements, in the gradients' dtype) stays allocated between steps.
    ledger.set("parameters (fp32)", (allocated if p.zero_stage == 3 else full) * FP32)
    if not p.offload_optimizer:  # ZeRO-Offload keeps both in host memory and steps them there
        ledger.set("deepspeed: fp32 master partition", partition * FP32)
        ledger.set("optimizer: AdamW moments", 2 * partition * FP32)
    ledger.set("deepspeed: gradient reduce bucket", bucket_elements(full) * _bytes_of(target.autocast))
    if p.zero_stage == 3:
        ledger.set("deepspeed: gradient partition", partition * FP32)
        if p.dp > 1:  # megatrain keeps the heads, norm and unembedding gathered for the loss node
            trunk = tuple(f"layers.{k}." for k in trunk_keys) + ("tok_embeddings.",)
            heads = sum(x.gathered_numel for x in held if not x.name.startswith(trunk))
            ledger.set("deepspeed: head parameters kept gathered", heads * FP32)
        return 0
    return (full if p.zero_stage == 1 else partition) * FP32


def _stage_layer_bytes(cfg: Config, key, micro: int, seq: int, target: Target, count: int) -> int:
    """Activations ``count`` trunk layers of one stage keep for one microbatch."""
    p = cfg.parallel
    if count == 0:
        return 0
    if p.activation_checkpointing == "full":
        n_checkpointed = count
    elif p.activation_checkpointing == "selective":
        n_checkpointed = (count + 1) // 2  # layers 0, 2, 4 ... of the stage
    else:
        n_checkpointed = 0
    # The stage's input (the embedding's output, or the activation received from the previous
    # stage) is kept by its first layer, in the residual stream's dtype (trace_layer's).
    shards = p.tp if p.sequence_parallel else 1
    total = micro * seq * cfg.model.dim * _bytes_of(target.fsdp_param_dtype) // shards
    for checkpointed, n in ((True, n_checkpointed), (False, count - n_checkpointed)):
        if n:
            layer = _layer(key, micro, seq, p.tp, target.autocast, checkpointed, target.fsdp_param_dtype)
            kept = layer.kept
            if p.sequence_parallel and p.tp > 1:  # the residual-stream tensors are sequence shards
                kept -= layer.sequence_local * (p.tp - 1) // p.tp
            total += n * kept
    return total


def _largest_layer(trunk: list[LocalParameter]) -> int:
    per_layer: dict[str, int] = {}
    for x in trunk:
        layer = ".".join(x.name.split(".")[:2])
        per_layer[layer] = per_layer.get(layer, 0) + x.gathered_numel
    return max(per_layer.values(), default=0)


def _largest_param(held: list[LocalParameter]) -> int:
    return max((x.local_numel for x in held), default=0)


def plan_layout(spec: RunSpec) -> list[RankPlan]:
    """Every rank's plan. Ranks that differ only in their data-parallel replica share one
    computation unless shard padding makes them differ (it is recomputed for the tail ranks)."""
    cfg = spec.config
    p = cfg.parallel
    shapes = model_shapes(cfg)
    world = p.dp * p.pp * p.tp
    plans = []
    cache: dict[tuple, RankPlan] = {}
    for rank in range(world):
        coords = rank_coords(rank, p.dp, p.pp, p.tp)
        held = local_parameters(cfg, rank, shapes)
        signature = (coords.pp_rank, coords.tp_rank, tuple(x.allocated_numel for x in held),
                     tuple(x.local_numel for x in held))
        if signature not in cache:
            cache[signature] = plan_rank(spec, rank, shapes)
        base = cache[signature]
        plans.append(RankPlan(rank, base.stages, base.peak_bytes, base.peak_phase, base.breakdown,
                              base.phases))
    return plans


def with_allowance(plan: RankPlan, target: Target) -> int:
    """Bytes the rank needs on its device: the prediction plus CUDA's own overheads."""
    if target.device != "cuda":
        return plan.peak_bytes
    return int(plan.peak_bytes * (1 + CUDA_FRAGMENTATION)) + CUDA_CONTEXT_BYTES

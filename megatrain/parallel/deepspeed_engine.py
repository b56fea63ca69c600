"""DeepSpeed ZeRO (stage 1, 2 or 3) as the data-parallel engine (``parallel.dp_engine=deepspeed``).

``build_deepspeed_model`` wraps the single ``MTPStage`` (dp only: ``ParallelDims.validate``
refuses tp/pp) with ``deepspeed.initialize`` and a client ``torch.optim.AdamW`` built exactly as
``megatrain.optim.build_optimizer`` builds it, so the update is the single-process trainer's.
``DeepSpeedModel`` satisfies the trainer's ``TrainingEngine`` protocol (engine.py), like
``ParallelModel``; its ``optimizer_step`` lets DeepSpeed clip, step and zero the gradients and
report its global gradient norm.

Design points (see PARALLEL.md, "DeepSpeed ZeRO"):

* Summed gradients. The loss is already normalised by the global batch (``head_scales``), so the
  wanted gradient is the SUM over dp ranks. DeepSpeed averages (ZeRO-3 rejects
  ``gradient_allreduce_op=sum``), so every micro-batch loss is multiplied by dp before
  ``engine.backward``: mean over dp of (dp * g_r) = sum of g_r, for every stage alike (exact for
  power-of-two dp). ``scale_wrt_gas=False``: the loss needs no division by the number of
  micro-batches either.
* Micro-batches: ``set_gradient_accumulation_boundary`` marks the last one, and one
  ``engine.step()`` follows (DeepSpeed's documented manual-boundary style).
* Non-finite steps: ZeRO's step computes the global gradient norm first and skips the update
  (and zeroes the gradients) when it is NaN/inf; ``optimizer_step`` reports that as not applied. The LR
  schedule is stepped by the trainer (not handed to DeepSpeed, which would skip it then).
* Checkpoints: ``DeepSpeedModelAndOptimizer`` gathers full fp32 parameters and AdamW moments
  per parameter (``deepspeed.utils.safe_get_full_*``) into megatrain's layout-independent DCP
  layout (``megatrain.parallel.model_state``), so a ZeRO checkpoint loads into FSDP/TP/PP/one process and
  back, at any dp degree.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.config import ParallelConfig, TrainConfig
from megatrain.errors import ConfigError
from megatrain.mtp_loss import HeadStats
from megatrain.optim import build_optimizer
from megatrain.parallel.parallelize import apply_activation_checkpointing, apply_compile, head_grad_sink
from megatrain.parallel.pipeline import MTPStage, split_model
from megatrain.parallel.process_group import dist_env
from megatrain.parallel.runtime import all_finite_everywhere, reduce_step_stats
from megatrain.profiling.phases import phase, phase_context

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements: ZeRO's reduce_bucket_size default

def import_deepspeed(device_type: str):
    """Import DeepSpeed for ``device_type``; a missing install is a ConfigError naming the fix."""
    # DeepSpeed picks its accelerator at import; on a CPU run it must not look for CUDA.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError(f"parallel.dp_engine=deepspeed needs DeepSpeed ({err}); install it with "
                          f"DS_BUILD_OPS=0 pip install -e '.[deepspeed]' or use "
                          f"parallel.dp_engine=fsdp") from None
    import logging
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if device_type == "cpu":
        # DeepSpeed's CPU backend builds its shared-memory all-reduce op (deepspeed_shm_comm) with a
        # JIT C++ compile when its communication starts: ~100 s on 2 cores the first time, for an op
        # only its inference_all_reduce uses; ZeRO's collectives go through torch.distributed. With
        # the op marked incompatible DeepSpeed skips the build (build_shm_op returns None).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def bucket_elements(n_params: int) -> int:
    """Elements of ZeRO's gradient reduce (and all-gather) buckets: DeepSpeed's default of 5e8,
    or the model's size if that is smaller. The buckets are allocated whole at start-up - 2 GB
    per rank in float32 at the default, whatever the model's size (measured: a 2M-parameter
    model's ZeRO-2 and ZeRO-3 ranks each held ~1.9 GiB before their first step)."""
    return min(DEEPSPEED_DEFAULT_BUCKET, max(n_params, 1))


def deepspeed_config(train: TrainConfig, parallel: ParallelConfig, *, dp: int, local_batch: int,
                     micro_batch_size: int, bf16: bool, extra: dict | None = None,
                     n_params: int = DEEPSPEED_DEFAULT_BUCKET) -> dict:
    """The DeepSpeed config megatrain generates; ``extra`` is merged into it (tests, tuning)."""
    micro = micro_batch_size or local_batch
    bucket = bucket_elements(n_params)
    zero: dict = {"stage": parallel.zero_stage, "reduce_bucket_size": bucket,
                  "allgather_bucket_size": bucket}
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": local_batch // micro,
        "train_batch_size": micro * (local_batch // micro) * dp,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # a client torch AdamW under ZeRO-Offload: exact, slower than DeepSpeedCPUAdam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    return OmegaConf.to_container(OmegaConf.merge(config, extra or {}))


@dataclass
class DeepSpeedModel:
    """This rank's DeepSpeed engine around its one MTPStage, with the trainer's interface."""

    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.AdamW  # the client AdamW inside ZeRO (its param_groups carry the lr)
    zero_stage: int
    dp: int
    grad_scale: float  # dp: turns DeepSpeed's dp-mean of gradients into the dp-sum
    param_group_of: dict[str, int]  # parameter name -> index of its AdamW param group

    @property
    def stages(self) -> list[MTPStage]:
        return [self.engine.module]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def checkpoint_state(self) -> Stateful:
        return DeepSpeedModelAndOptimizer(self)

    def parameters_are_finite(self) -> bool:
        """Whether ZeRO's fp32 master partitions (what a checkpoint saves) are all finite."""
        local = all(bool(torch.isfinite(flat).all()) for flat in self.master_partitions())
        return all_finite_everywhere(local)

    def named_parameters(self):
        for name, p in self.engine.module.named_parameters():
            yield name.replace(WRAPPER_PREFIX, ""), p

    def group(self, axis: str):
        """The dp process group (the whole world: DeepSpeed runs dp only); None for one rank."""
        return dist.group.WORLD if axis == "dp" and self.dp > 1 else None

    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> HeadStats:
        """Forward only (ZeRO-3 gathers through the module's hooks); same windows on every rank."""
        stage = self.engine.module
        stage.head_scales, stage.stats = torch.ones(stage.n_future), []
        stage.eval()
        try:
            with torch.no_grad():
                stage(tokens, targets=targets.transpose(0, 1))
        finally:
            stage.train()
        return stage.stats[0]

    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor, head_scales: torch.Tensor,
                         micro_batch_size: int = 0) -> tuple[float, HeadStats]:
        """Forward + backward of this dp rank's rows, like ``ParallelModel.forward_backward``.

        Gradients end up reduced (summed over dp) in ZeRO's partitions; ``optimizer_step`` applies them.
        """
        stage = self.engine.module
        stage.head_scales = head_scales.float()
        stage.stats = []
        micro = micro_batch_size or tokens.shape[0]
        starts = list(range(0, tokens.shape[0], micro))
        local_loss = torch.zeros((), dtype=torch.float64)
        for k, start in enumerate(starts):
            self.engine.set_gradient_accumulation_boundary(k == len(starts) - 1)
            with phase_context(stage=0, microbatch=k):
                loss = self.engine(tokens[start:start + micro],
                                   targets=targets[:, start:start + micro].transpose(0, 1))
                with phase("trunk.backward"):
                    self.engine.backward(loss * self.grad_scale, scale_wrt_gas=False)
            local_loss += loss.detach().double().cpu()
        stage.head_grad_sink.check_settled()
        return reduce_step_stats(local_loss, stage.stats, stage.n_future, [self.group("dp")])

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip (train.grad_clip, from the DeepSpeed config), apply AdamW and zero the gradients,
        as one DeepSpeed step.

        Returns (global gradient norm before clipping, whether the update was applied). ZeRO
        computes the norm first and skips a step whose norm is NaN/inf; a non-finite loss with a
        finite norm still counts as not applied, as in ``ParallelModel.optimizer_step``.
        """
        with phase("optimizer.step"):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, math.isfinite(loss) and bool(self.engine.was_step_applied())

    # ---- ZeRO internals used by checkpoints -----------------------------------------------------
    def master_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 partitions the client AdamW steps (its optimizer-state keys)."""
        zero = self.engine.optimizer
        if self.zero_stage == 3:
            return list(zero.fp32_partitioned_groups_flat)
        return list(zero.single_partition_of_fp32_groups)

    def init_optimizer_state(self) -> None:
        """Create AdamW's state now (zeros, step 0: what its first step would create) so that
        checkpoints can read and write it before any step; ZeRO-1/2 then link each parameter's
        fragment of it (done lazily after the first step otherwise)."""
        # torch keeps AdamW's step count on the CPU unless the fused/capturable kernel runs
        on_device = self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable")
        for flat in self.master_partitions():
            if flat in self.optimizer.state:
                continue
            self.optimizer.state[flat] = {
                "step": torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format)}
        if self.zero_stage != 3:
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()


def parallelize_deepspeed(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, *,
                          device: torch.device, local_batch: int, micro_batch_size: int = 0,
                          ignore_index: int = -100, impl: str = "auto", bf16: bool = False,
                          extra_config: dict | None = None,
                          compile_blocks: bool = False) -> DeepSpeedModel:
    """``parallelize_mtp``'s counterpart for ``parallel.dp_engine=deepspeed``: the whole model as one
    MTPStage (dp only), activation checkpointing, then ZeRO."""
    stage = split_model(model, [model.layout.n_trunk_layers], [0], ignore_index, impl)[0]
    stage.head_grad_sink = head_grad_sink(parallel)  # ZeRO's hooks: "shared"
    apply_activation_checkpointing(stage, parallel.activation_checkpointing)
    if compile_blocks:
        apply_compile(stage)
    return build_deepspeed_model(stage, train, parallel, device=device, local_batch=local_batch,
                                 micro_batch_size=micro_batch_size, bf16=bf16,
                                 extra_config=extra_config)


def build_deepspeed_model(stage: MTPStage, train: TrainConfig, parallel: ParallelConfig, *,
                          device: torch.device, local_batch: int, micro_batch_size: int = 0,
                          bf16: bool = False, extra_config: dict | None = None) -> DeepSpeedModel:
    """``deepspeed.initialize`` the stage (same initial weights on every rank) with the client
    AdamW; ``extra_config`` is merged into the generated DeepSpeed config."""
    deepspeed = import_deepspeed(device.type)
    if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed insists on LOCAL_RANK, which srun does not set (SLURM_LOCALID instead)
    os.environ.setdefault("LOCAL_RANK", str(dist_env().local_rank))
    dp = dist.get_world_size()
    # The optimizer steps the fp32 master partitions: on the CPU when they are offloaded.
    optimizer = build_optimizer(stage, train, "cpu" if parallel.offload_optimizer else device.type)
    # ZeRO swaps the groups' parameters for its flat partitions: remember which group each was in
    group_by_id = {id(p): k for k, group in enumerate(optimizer.param_groups) for p in group["params"]}
    param_group_of = {name.replace(WRAPPER_PREFIX, ""): group_by_id[id(p)]
                      for name, p in stage.named_parameters()}
    config = deepspeed_config(train, parallel, dp=dp, local_batch=local_batch,
                              micro_batch_size=micro_batch_size, bf16=bf16, extra=extra_config,
                              n_params=sum(p.numel() for p in stage.parameters()))
    if parallel.zero_stage == 3:
        keep_gathered_for_the_loss(deepspeed, stage)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=stage, optimizer=optimizer, config=config,
                                                        dist_init_required=False)
    assert zero_optimizer.optimizer is optimizer  # ZeRO steps our AdamW on its fp32 partitions
    model = DeepSpeedModel(engine, optimizer, parallel.zero_stage, dp, grad_scale=float(dp),
                           param_group_of=param_group_of)
    model.init_optimizer_state()
    return model


def keep_gathered_for_the_loss(deepspeed, stage: MTPStage) -> None:
    """ZeRO-3: gather every head's, the norm's and the unembedding's parameters for the whole
    forward of the stage (and again at the start of its backward), like FSDP's root unit.

    ``SequentialHeadsLoss`` takes these parameters as inputs: autograd records their shapes
    when the node is *created*, before any head's own pre-forward hook has gathered them, so
    partitioned (empty) placeholders there make every head gradient a shape error. As external
    parameters of the stage they are gathered by its pre-forward hook, stay gathered while the
    heads' own hooks come and go inside the node (the stage is still active), and are gathered
    again by the stage's pre-backward hook when the node hands out their gradients.
    """
    for p in stage.all_head_params():
        deepspeed.zero.register_external_parameter(stage, p)


class DeepSpeedModelAndOptimizer(Stateful):
    """``ModelAndOptimizer``'s DCP layout (megatrain.parallel.model_state) from a ZeRO engine:
    full fp32 parameters under ``model.<name>`` and flattened AdamW state
    (``optimizer.state.<name>.exp_avg`` ..., ``optimizer.param_groups.<name>.lr`` ...), whatever
    the ZeRO stage or dp degree.

    Every rank gathers every full tensor (collectives, one parameter at a time) and DCP writes
    each once: simple and reshardable, but a rank briefly holds a full fp32 copy of the model and
    both moments (see PARALLEL.md for the limits).
    """

    def __init__(self, model: DeepSpeedModel):
        self.model = model
        self.group_of = model.param_group_of
        self.group_keys = [sorted(k for k in g if k != "params") for g in model.optimizer.param_groups]

    def state_dict(self):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        model_sd, optim_sd = {}, {}
        step = self.model.optimizer.state[self.model.master_partitions()[0]]["step"]
        groups = self.model.optimizer.param_groups
        for name, p in self.model.named_parameters():
            model_sd[name] = safe_get_full_fp32_param(p).detach().cpu()
            for key in ADAM_MOMENTS:
                optim_sd[f"state.{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu()
            optim_sd[f"state.{name}.step"] = step.detach().cpu().clone()
            group = groups[self.group_of[name]]
            for key in self.group_keys[self.group_of[name]]:
                optim_sd[f"param_groups.{name}.{key}"] = copy.copy(group[key])
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        model_sd, optim_sd = state["model"], state["optimizer"]
        rank = dist.get_rank()
        for name, p in self.model.named_parameters():
            full = model_sd[name]
            safe_set_full_fp32_param(p, full.to(self._hp_device(), torch.float32))  # fp32 master
            if self.model.zero_stage == 3:  # the module's (partitioned) copy
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.data.copy_(full.to(p.device, p.dtype))
            else:
                p.data.copy_(full.to(p.device, p.dtype))
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(p, optim_sd[f"state.{name}.{key}"].to(self._hp_device()), key)
        first = next(iter(self.group_of))
        for flat in self.model.master_partitions():
            held = self.model.optimizer.state[flat]["step"]
            held.copy_(optim_sd[f"state.{first}.step"].to(held.device, held.dtype))
        for k, group in enumerate(self.model.optimizer.param_groups):
            name = next(n for n, g in self.group_of.items() if g == k)
            for key in self.group_keys[k]:
                group[key] = optim_sd[f"param_groups.{name}.{key}"]

    def _hp_device(self):
        return self.model.master_partitions()[0].device

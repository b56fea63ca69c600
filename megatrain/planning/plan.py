"""``megatrain plan``: will this layout fit, on which rank is the peak, and what would make it fit.

``make_plan`` resolves the layout (the world size fills ``parallel.dp`` when it is left at 1),
predicts every rank (memory_model.py) and, when the largest rank does not fit, re-plans the
cheapest changes one at a time and names those that would fit. Exit status of the CLI: 0 fits,
1 does not fit, 2 bad input.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from omegaconf import OmegaConf

from megatrain.config import Config
from megatrain.errors import ConfigError
from megatrain.parallel.topology import ParallelDims
from megatrain.planning.memory_model import RankPlan, plan_layout, target_of, with_allowance
from megatrain.spec import RunSpec, resolve

GB = 1e9
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1


@dataclass
class Plan:
    spec: RunSpec
    ranks: list[RankPlan]
    device_memory_bytes: int
    needed: list[int]  # per rank: prediction plus the device's own overheads

    @property
    def cfg(self) -> Config:
        return self.spec.config

    @property
    def worst(self) -> RankPlan:
        return self.ranks[max(range(len(self.ranks)), key=lambda r: self.needed[r])]

    @property
    def peak_bytes(self) -> int:
        return max(self.needed)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_memory_bytes

    def to_json(self) -> dict:
        return {"fits": self.fits, "device_memory_bytes": self.device_memory_bytes,
                "peak_bytes": self.peak_bytes,
                "ranks": [{"rank": r.rank, "stage": r.stages[0], "stages": r.stages,
                           "peak_bytes": need, "allocated_peak_bytes": r.peak_bytes,
                           "peak_phase": r.peak_phase, "breakdown": r.breakdown, "phases": r.phases}
                          for r, need in zip(self.ranks, self.needed)]}


def resolve_layout(cfg: Config, world_size: int | None) -> RunSpec:
    """``cfg`` resolved (``megatrain.spec.resolve``, without building the embedded corpus) for
    ``world_size`` processes: ``parallel.dp`` left at 1 takes what tp and pp leave."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    if world_size is not None:
        if p.dp == 1 and world_size % (p.tp * p.pp) == 0:
            p.dp = world_size // (p.tp * p.pp)
        ParallelDims(p.dp, p.tp, p.pp, world_size)  # names the keys when the product differs
    return resolve(cfg, world_size=world_size, data="existing")


def make_plan(cfg: Config, device_memory_gb: float, world_size: int | None = None) -> Plan:
    spec = resolve_layout(cfg, world_size)
    ranks = plan_layout(spec)
    target = target_of(spec.config)
    needed = [with_allowance(r, target) for r in ranks]
    return Plan(spec, ranks, int(device_memory_gb * GB), needed)


# ---- what would make it fit -------------------------------------------------------------------
def _alternatives(spec: RunSpec, gpus_per_node: int | None) -> list[tuple[str, list[str]]]:
    """(description, overrides) of single changes, cheapest in step time first."""
    p = spec.config.parallel
    out = []
    micro = spec.micro_batch
    if micro > 1:
        out.append(("halve the microbatch",
                    [f"train.micro_batch_size={micro // 2}"]))
    if p.activation_checkpointing == "none":
        out.append(("selective activation checkpointing", ["parallel.activation_checkpointing=selective"]))
    if p.activation_checkpointing != "full":
        out.append(("full activation checkpointing", ["parallel.activation_checkpointing=full"]))
    if p.tp > 1 and not p.sequence_parallel:
        out.append(("sequence parallelism", ["parallel.sequence_parallel=true"]))
    for key in ("tp", "pp"):
        degree = getattr(p, key) * 2
        if p.dp % 2 == 0 and (key != "tp" or not gpus_per_node or degree <= gpus_per_node):
            out.append((f"raise parallel.{key} to {degree} (parallel.dp {p.dp} -> {p.dp // 2})",
                        [f"parallel.{key}={degree}", f"parallel.dp={p.dp // 2}"]))
    if p.dp > 1 and p.tp == 1 and p.pp == 1 and not (p.dp_engine == "deepspeed" and p.zero_stage == 3):
        out.append(("DeepSpeed ZeRO-3", ["parallel.dp_engine=deepspeed", "parallel.zero_stage=3"]))
    return out


def _changed(cfg: Config, overrides: list[str]) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides)))


@dataclass(frozen=True)
class Suggestion:
    change: str  # in words
    overrides: tuple[str, ...]  # the config keys that make it
    peak_bytes: int  # the changed layout's predicted peak


def suggestions(plan: Plan, gpus_per_node: int | None = None) -> list[Suggestion]:
    """The single changes that would fit, cheapest in step time first."""
    found = []
    for description, overrides in _alternatives(plan.spec, gpus_per_node):
        try:
            changed = make_plan(_changed(plan.cfg, overrides), plan.device_memory_bytes / GB)
        except ConfigError:
            continue  # not a valid layout for this model (e.g. tp must divide the heads)
        if changed.fits:
            found.append(Suggestion(description, tuple(overrides), changed.peak_bytes))
    return found


# ---- printing -----------------------------------------------------------------------------------
CATEGORIES = (("parameters", ("parameters", "deepspeed: fp32 master")), ("gradients", ("gradients",)),
              ("optimizer", ("optimizer",)), ("activations", ("activations",)), ("heads", ("heads",)),
              ("fsdp buffers", ("fsdp",)))


def _category(name: str) -> str:
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "other"


def table(plan: Plan) -> str:
    """One row per pipeline stage (its largest rank), then the verdict."""
    by_stage: dict[int, tuple[RankPlan, int]] = {}
    for r, need in zip(plan.ranks, plan.needed):
        stage = r.stages[-1] if len(r.stages) > 1 else r.stages[0]
        if stage not in by_stage or need > by_stage[stage][1]:
            by_stage[stage] = (r, need)
    columns = [c for c, _ in CATEGORIES] + ["other"]
    header = f"{'stage':>5} {'rank':>5} " + " ".join(f"{c:>12}" for c in columns) + \
        f" {'peak (GB)':>10}  at"
    lines = [header, "-" * len(header)]
    for stage in sorted(by_stage):
        r, need = by_stage[stage]
        sums = dict.fromkeys(columns, 0)
        for name, value in r.breakdown.items():
            sums[_category(name)] += value
        sums["other"] += need - r.peak_bytes  # the device's allowance
        label = "+".join(map(str, r.stages))
        lines.append(f"{label:>5} {r.rank:>5} " + " ".join(f"{sums[c] / GB:>12.2f}" for c in columns)
                     + f" {need / GB:>10.2f}  {r.peak_phase}")
    worst = plan.worst
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    headroom = plan.device_memory_bytes - plan.peak_bytes
    lines.append(f"largest rank: {worst.rank} (stage {'+'.join(map(str, worst.stages))}), "
                 f"{plan.peak_bytes / GB:.2f} GB of {plan.device_memory_bytes / GB:.0f} GB: {verdict} "
                 f"({'headroom' if headroom >= 0 else 'short by'} {abs(headroom) / GB:.2f} GB)")
    return "\n".join(lines)


def report(plan: Plan, *, as_json: bool, gpus_per_node: int | None = None) -> str:
    fixes = [] if plan.fits else suggestions(plan, gpus_per_node)
    if as_json:
        found = [{"change": f.change, "overrides": list(f.overrides), "peak_bytes": f.peak_bytes}
                 for f in fixes]
        return json.dumps({**plan.to_json(), "suggestions": found}, indent=1)
    text = table(plan)
    if fixes:
        text += "\nchanges that would fit (cheapest first):\n" + "\n".join(
            f"  - {f.change}: {' '.join(f.overrides)} -> {f.peak_bytes / GB:.2f} GB" for f in fixes)
    elif not plan.fits:
        text += "\nno single change fits: combine them, or use more GPUs"
    return text

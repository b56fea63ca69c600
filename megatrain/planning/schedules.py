"""The order in which a pipeline rank runs its forwards and backwards, and what that keeps alive.

A stage keeps a microbatch's saved activations from that microbatch's forward to its backward
(its input-gradient half, under the zero-bubble schedules). So a rank's activation memory over
the step follows its sequence of actions. For the schedules torch.distributed.pipelining builds
from an explicit per-rank program (interleaved 1F1B, ZB-V, DualPipeV) that program is asked for
directly (``_calculate_single_rank_operations``, the schedule's own arithmetic, on an object that
holds only the numbers it reads); GPipe and 1F1B are written out here:

- GPipe: every forward, then every backward;
- 1F1B: min(M, S - s) warm-up forwards on stage s of S, then one backward and one forward in
  turn, then the remaining backwards (torch's ``Schedule1F1B``).

``occupancy`` replays the actions and yields, after each, how many microbatches every local
stage holds and whether gradients already exist; the planner weighs those counts with each
stage's activations per microbatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed.pipelining.schedules as torch_schedules

from megatrain.parallel.pipeline_layout import V_SHAPED

_PROGRAMS = {"interleaved_1f1b": torch_schedules.ScheduleInterleaved1F1B,
             "zbv": torch_schedules.ScheduleZBVZeroBubble,
             "dualpipev": torch_schedules.ScheduleDualPipeV}


@dataclass(frozen=True)
class Action:
    stage: int
    kind: str  # "F" forward, "B" full backward, "I" input-gradient backward, "W" weight backward
    microbatch: int


def rank_actions(schedule: str, pp: int, pp_rank: int, n_microbatches: int,
                 stages_per_rank: int) -> list[Action]:
    """The forwards and backwards ``pp_rank`` runs in one step, in order (stage ids are global)."""
    m = n_microbatches
    if pp == 1:
        return [Action(0, kind, i) for i in range(m) for kind in "FB"]
    if schedule == "gpipe":
        return [Action(pp_rank, "F", i) for i in range(m)] + [Action(pp_rank, "B", i) for i in range(m)]
    if schedule == "1f1b":
        warmup = min(m, pp - pp_rank)
        actions = [Action(pp_rank, "F", i) for i in range(warmup)]
        forward, backward = warmup, 0
        while backward < m:
            actions.append(Action(pp_rank, "B", backward))
            backward += 1
            if forward < m:
                actions.append(Action(pp_rank, "F", forward))
                forward += 1
        return actions
    if schedule not in _PROGRAMS:
        raise ValueError(f"unknown pipeline schedule {schedule!r}")
    return [Action(a.stage_index, _KINDS[a.computation_type], a.microbatch_index)
            for a in _program(schedule, pp, pp_rank, m, stages_per_rank)]


def _program(schedule: str, pp: int, pp_rank: int, m: int, v: int) -> Iterator:
    """torch's own per-rank program for a runtime schedule, computed without any stage."""
    cls = _PROGRAMS[schedule]
    program = object.__new__(cls)  # only the arithmetic is wanted: no stages, no process group
    program.pp_group_size, program._n_microbatches, program.n_local_stages = pp, m, v
    program.rank, program.num_stages, program._num_stages = pp_rank, pp * v, pp * v
    program.number_of_rounds = max(1, m // pp)
    program.microbatches_per_round = m // program.number_of_rounds
    program.stage_index_to_group_rank = torch_schedules.generate_stage_to_rank_mapping(
        pp, pp * v, style="v" if schedule in V_SHAPED else "loop")
    for action in program._calculate_single_rank_operations(pp_rank):
        if action is None:
            continue
        yield from (action.sub_actions or [action])  # DualPipeV overlaps a forward with a backward


_KINDS = {torch_schedules._ComputationType.FORWARD: "F",
          torch_schedules._ComputationType.FULL_BACKWARD: "B",
          torch_schedules._ComputationType.BACKWARD_INPUT: "I",
          torch_schedules._ComputationType.BACKWARD_WEIGHT: "W"}


@dataclass(frozen=True)
class Moment:
    """The state right before ``action`` runs (backwards) or right after it (forwards)."""

    action: Action
    holding: dict[int, int]  # stage -> microbatches whose activations it keeps
    gradients: bool  # whether a backward has already produced gradients this step


def occupancy(actions: list[Action]) -> Iterator[Moment]:
    holding: dict[int, int] = {}
    gradients = False
    for action in actions:
        if action.kind == "F":
            holding[action.stage] = holding.get(action.stage, 0) + 1
            yield Moment(action, dict(holding), gradients)
        elif action.kind in "BI":
            yield Moment(action, dict(holding), gradients)  # its backward runs on these
            holding[action.stage] -= 1
            gradients = True
        else:  # W: the weight gradients of a microbatch whose input gradients are done
            gradients = True


def is_v_shaped(schedule: str) -> bool:
    return schedule in V_SHAPED

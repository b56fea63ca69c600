"""The planner's parameter arithmetic against our real parallelisation, up to the paper's 13B.

The real side builds the model on the meta device and applies ``parallelize_mtp`` (TP plans,
pipeline split, FSDP2) for one rank of the full world, in this one process, under torch's
"fake" process group: its collectives do nothing, so only shard shapes are real - which is all
this compares. A forked child per layout keeps the fake group out of the test process.
"""

from __future__ import annotations

import pytest
import torch

from megatrain.config import load_config
from megatrain.planning.shards import chunk_size, local_parameters, model_shapes, rank_coords

README_LAYOUTS = {
    # README: "6.7B on 8 nodes x 8 GPUs, FSDP over all 64 GPUs"
    "6.7b_dp64": ("configs/paper/6.7b_n4.yaml", ["parallel.dp=64",
                                                 "parallel.activation_checkpointing=selective"]),
    # README: "13B on 16 nodes x 8 GPUs: tp 8 within a node, 2 pipeline stages, dp 8"
    "13b_dp8_tp8_pp2": ("configs/paper/13b_n4.yaml", ["parallel.dp=8", "parallel.tp=8", "parallel.pp=2",
                                                      "parallel.pp_schedule=1f1b",
                                                      "parallel.sequence_parallel=true"]),
}


def real_local_numels(cfg, ranks: list[int]) -> dict[int, dict[str, int]]:
    """{rank: {parameter name: elements the rank holds}} from the real parallelisation."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatrain.model.mtp import MTPTransformer
    from megatrain.parallel.parallelize import parallelize_mtp
    from megatrain.parallel.topology import ParallelDims

    p = cfg.parallel
    world = p.dp * p.tp * p.pp
    out = {}
    for rank in ranks:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            dims = ParallelDims(p.dp, p.tp, p.pp, world)
            with torch.device("meta"):
                model = MTPTransformer(cfg.model, max_seq_len=cfg.data.seq_len)
            engine = parallelize_mtp(model, dims, dims.build_mesh("cpu"), p,
                                     local_batch=cfg.train.batch_size // p.dp,
                                     micro_batch_size=cfg.train.micro_batch_size)
            numels = {}
            for stage in engine.stages:
                for name, param in stage.named_parameters():
                    local = param.to_local() if isinstance(param, DTensor) else param
                    numels[name.replace("_checkpoint_wrapped_module.", "")] = local.numel()
            out[rank] = numels
        finally:
            dist.destroy_process_group()
    return out


def _in_child(fn, *args):
    """Run ``fn`` in a forked child (the fake process group must not outlive it)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def corner_ranks(dp: int, pp: int, tp: int) -> list[int]:
    """Every pipeline stage at the first and the last two tensor- and data-parallel positions.

    A rank's shards depend on its position along each axis only through torch.chunk's split:
    every chunk is full except the last non-empty one, and any after it are empty, so the first
    and the last two positions cover every distinct case (building all 128 ranks of the 13B
    layout takes minutes on 2 cores).
    """
    def positions(size):
        return sorted({0, max(size - 2, 0), size - 1})
    return sorted({(d * pp + s) * tp + t for d in positions(dp) for s in range(pp) for t in positions(tp)})


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(README_LAYOUTS))
def test_every_rank_holds_exactly_the_parameters_the_planner_predicts(layout):
    path, overrides = README_LAYOUTS[layout]
    cfg = load_config(path, overrides)
    p = cfg.parallel
    ranks = corner_ranks(p.dp, p.pp, p.tp)
    real = _in_child(real_local_numels, cfg, ranks)
    shapes = model_shapes(cfg)
    for rank in ranks:
        planned = {x.name: x.local_numel for x in local_parameters(cfg, rank, shapes)}
        differ = sorted(k for k in set(planned) | set(real[rank]) if planned.get(k) != real[rank].get(k))
        assert not differ, (f"{layout} rank {rank} {rank_coords(rank, p.dp, p.pp, p.tp)}: planner and "
                            f"parallelize_mtp disagree on {differ[:5]}")


def test_chunk_sizes_follow_torch_chunk():
    """DTensor and FSDP2 split like torch.chunk: the arithmetic matches it on odd sizes."""
    for n in (1, 7, 8, 13, 100, 32000, 32003):
        for parts in (1, 2, 3, 8, 64):
            expected = [c.numel() for c in torch.empty(n).chunk(parts)]
            expected += [0] * (parts - len(expected))
            assert [chunk_size(n, parts, i) for i in range(parts)] == expected, (n, parts)


def test_planner_arithmetic_catches_a_wrong_layout():
    """Negative control: the comparison above rejects shards of a different layout."""
    cfg = load_config("configs/paper/13b_n4.yaml", ["parallel.dp=8", "parallel.tp=8", "parallel.pp=2"])
    shapes = model_shapes(cfg)
    right = {x.name: x.local_numel for x in local_parameters(cfg, 9, shapes)}
    wrong_cfg = load_config("configs/paper/13b_n4.yaml", ["parallel.dp=4", "parallel.tp=16", "parallel.pp=2"])
    wrong = {x.name: x.local_numel for x in local_parameters(wrong_cfg, 9, shapes)}
    assert right != wrong


def test_the_heads_trace_holds_rank_0s_shards_of_the_sequential_modules():
    """Under tp the sequential modules' blocks and eh_proj are sharded as the real plan shards them
    (``tp_split_dim``). It counted every module whole before, overestimating the last stage by a
    block per module, then eh_proj whole (2 dim^2 per module)."""
    from megatrain.model.mtp import MTPTransformer
    from megatrain.parallel.tensor_parallel import tp_split_dim
    from megatrain.planning.trace import trace_heads

    cfg = load_config(None, ["model.mtp_kind=sequential", "model.n_future=3", "model.n_layers=4",
                             "model.vocab_size=512"]).model
    with torch.device("meta"):
        model = MTPTransformer(cfg, max_seq_len=64)
    names = {id(p): name for name, p in model.named_parameters()}

    def rank0_bytes(tp):
        total = 0
        for p in model.all_head_params():
            split = tp_split_dim(names[id(p)])
            total += p.numel() * 4 // (1 if split is None else tp)
        return total

    for tp in (1, 2):
        assert trace_heads(cfg, 2, 64, tp=tp).head_set == rank0_bytes(tp), tp
    assert rank0_bytes(2) < 0.6 * rank0_bytes(1)  # the blocks are most of it: a real difference


def test_the_heads_trace_holds_rank_0s_shards_of_replicated_unembeddings():
    """head_type=replicated: each head's own unembedding is vocabulary-sharded under tp like
    ``output``, so the last stage's head gradients shrink with tp; the planner's shard arithmetic
    places every extra unembedding on the last stage."""
    from megatrain.planning.shards import stage_of_parameter
    from megatrain.planning.trace import trace_heads

    cfg = load_config(None, ["model.head_type=replicated", "model.n_future=3", "model.n_layers=4",
                             "model.vocab_size=512", "parallel.pp=2"])
    m = cfg.model
    for tp in (1, 2):
        assert trace_heads(m, 2, 64, tp=tp).head_set == (m.dim + 3 * (512 // tp) * m.dim) * 4, tp
    assert stage_of_parameter("extra_outputs.1.weight", cfg, [2, 2]) == 1

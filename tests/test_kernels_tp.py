"""Vocabulary-parallel ``fused_linear_cross_entropy`` (``tp_group``) on 2 gloo processes equals
the single-process result: loss for every reduction, n_correct (argmax combined across shards,
including a tie across shards), grad_hidden (summed over the group) and the local shard of
grad_weight/grad_bias. Both impls; the Triton one runs in the interpreter in the workers.

Workers are forked from the pytest process (no second torch import; FIELD_NOTES) and report
through JSON files; they set TRITON_INTERPRET=1 before the Triton kernels are first imported.
Triton workers are always spawned fresh (a fork would inherit kernels another test imported
without the interpreter), and so are all workers once a default process group exists here.
"""

import json
import multiprocessing
import os
import sys

import pytest
import torch

WORLD = 2
N, D, V = 37, 48, 1002  # V_local = 501: no shard is a multiple of any block


def _worker(rank, impl, init_file, out_file):
    status = {"rank": rank}
    try:
        torch.set_num_threads(1)
        if impl == "triton":  # CPU tensors: the interpreter, also on a GPU machine
            os.environ["TRITON_INTERPRET"] = "1"
        import torch.distributed as dist

        from megatrain.kernels import fused_linear_cross_entropy
        from megatrain.kernels import testing as kt
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD)
        group = dist.new_group(list(range(WORLD)))
        case = kt.make_case(N, D, V, torch.float32, bias=True, seed=3)
        # row 0: shard 0's id 7 and shard 1's id 900 tie exactly (integer data, exact in fp32)
        case["weight"][7] = case["weight"][900] = 1.0
        case["bias"][7] = case["bias"][900] = 0.0
        case["hidden"][0] = 2.0
        case["targets"][0] = 7
        lo, hi = rank * (V // WORLD), (rank + 1) * (V // WORLD)
        shard = dict(case, weight=case["weight"][lo:hi].clone(), bias=case["bias"][lo:hi].clone())
        errors = {}
        for reduction in ("mean", "sum", "none"):
            full = kt.run(fused_linear_cross_entropy, case, reduction, impl=impl)
            par = kt.run(fused_linear_cross_entropy, shard, reduction, impl=impl, tp_group=group)
            for key in ("loss", "grad_hidden"):
                errors[f"{reduction}/{key}"] = (par[key] - full[key]).abs().max().item()
            for key in ("grad_weight", "grad_bias"):
                errors[f"{reduction}/{key}"] = (par[key] - full[key][lo:hi]).abs().max().item()
            errors[f"{reduction}/n_correct"] = int(par["n_correct"]) - int(full["n_correct"])
            status["n_correct"] = int(full["n_correct"])
        status["errors"] = errors
        dist.destroy_process_group()
    except BaseException as exc:  # report, don't hang the parent
        status["error"] = repr(exc)
    with open(out_file, "w") as f:
        json.dump(status, f)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo aborts seen at shutdown, FIELD_NOTES)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vocab_parallel_equals_single_process(impl, tmp_path):
    import torch.distributed as dist
    # Triton workers always start fresh: any kernel module imported earlier in this process
    # (by another test, without the interpreter) would be inherited by a fork.
    fresh = dist.is_initialized() or impl == "triton"
    ctx = multiprocessing.get_context("spawn" if fresh else "fork")
    outs = [tmp_path / f"rank{r}.json" for r in range(WORLD)]
    procs = [ctx.Process(target=_worker, args=(r, impl, tmp_path / "init", outs[r]))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    for out in outs:
        assert out.exists(), f"{out.name}: worker died without a report"
        status = json.loads(out.read_text())
        assert "error" not in status, status
        assert status["n_correct"] > 1
        for key, err in status["errors"].items():
            limit = 0 if key.endswith("n_correct") else 2e-5
            assert abs(err) <= limit, f"rank {status['rank']} {key}: |tp - single| = {err:.3g}"

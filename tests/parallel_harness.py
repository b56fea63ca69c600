"""Multi-process test harness: forked gloo workers and the single-process reference they match.

``run_ranks(world_size, fn, *args, **kwargs)`` forks ``world_size`` workers from the
(torch-importing) test process - much cheaper than torchrun per test - sets the torchrun
environment, joins the process group, runs ``fn(rank, *args, **kwargs)`` and returns every rank's
result. Forked, not spawned: ``fn`` (a closure too) and its arguments reach the workers without
being pickled; only the results are. Workers leave with ``os._exit`` after sending their result:
on CPU/gloo 10-17% of FSDP2 / sequence-parallel runs aborted at interpreter shutdown after
succeeding, and a forked child must not run the parent's atexit handlers.

``reference_run`` is the single-process trainer step (trunk, sequential-heads loss per
microbatch, clip, AdamW) on the same data; ``parallel_run`` is the same through
``megatrain.parallel``. Both return per-step losses and the full (gathered) parameters, which
``assert_matches`` compares, with the first step's gradients (before clipping: what the layout
computed, not yet smoothed by AdamW); ``assert_comparison_catches`` is the negative control that
shows the comparison rejects a deliberately wrong run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback

import pytest
import torch

from megatrain.config import ModelConfig, TrainConfig
from megatrain.model.mtp import MTPTransformer
from megatrain.mtp_loss import build_head_targets, head_scales, mtp_loss
from megatrain.optim import build_optimizer

SEQ_LEN, BATCH, STEPS, LR = 16, 4, 5, 3e-3


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(n_layers=6, n_future=4, dim=32, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16)
    base.update(overrides)
    return ModelConfig(**base)


def batches(cfg: ModelConfig, steps=STEPS, batch=BATCH, seq_len=SEQ_LEN, seed=1234):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(steps)]


def build_model(cfg: ModelConfig, seed=0, seq_len=SEQ_LEN) -> MTPTransformer:
    torch.manual_seed(seed)
    return MTPTransformer(cfg, max_seq_len=seq_len)


def _train_cfg(steps):
    return TrainConfig(lr=LR, steps=steps, warmup_steps=0, grad_clip=1.0)


def _targets(cfg, window):
    targets = build_head_targets(window, cfg.n_future, -100)
    return targets, head_scales((targets != -100).flatten(1).sum(1), [1.0] * cfg.n_future)


def full_params(named_params, grads: bool = False) -> dict:
    """name -> full tensor (DTensors gathered; checkpoint-wrapper prefixes removed); ``grads``:
    the parameters' gradients instead (parameters without one are left out)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, p in named_params:
        t = p.grad if grads else p.detach()
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name.replace("_checkpoint_wrapped_module.", "")] = t.clone()
    return out


def reference_run(cfg: ModelConfig, steps=STEPS, micro=0, data=None):
    """The single-process trainer step, as megatrain.trainer.train runs it."""
    model = build_model(cfg)
    optimizer = build_optimizer(model, _train_cfg(steps), "cpu")
    losses, grad_norms, grads = [], [], None
    for window in data or batches(cfg, steps):
        targets, scales = _targets(cfg, window)
        micro_ = micro or window.shape[0]
        total = 0.0
        for s in range(0, window.shape[0], micro_):
            hidden = model.trunk(window[s:s + micro_, :-1])
            loss, _ = mtp_loss(model, hidden, targets[:, s:s + micro_], scales, -100, "torch")
            loss.backward()
            total += loss.item()
        if grads is None:
            grads = full_params(model.named_parameters(), grads=True)
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        grad_norms.append(float(norm))
    return {"losses": losses, "params": full_params(model.named_parameters()), "grad_norms": grad_norms,
            "grads": grads}


def parallel_run(rank, cfg: ModelConfig, *, dp, tp, pp, parallel_kwargs=None, steps=STEPS, micro=0,
                 corrupt=None, batch=BATCH):
    """One rank of the same training through megatrain.parallel on a dp x tp x pp mesh.

    Keyword-only after ``cfg``: a call reads ``dp=2, tp=1, pp=1, micro=1``, not a row of bare
    numbers. ``parallel_kwargs``: further ``ParallelConfig`` fields; ``corrupt``: see
    ``train_parallel``.
    """
    from megatrain.parallel import ParallelConfig, ParallelDims, parallelize_mtp

    dims = ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp)
    mesh = dims.build_mesh("cpu")
    parallel = ParallelConfig(dp=dp, tp=tp, pp=pp, **(parallel_kwargs or {}))
    share = batch // dp
    pm = parallelize_mtp(build_model(cfg), dims, mesh, parallel, local_batch=share,
                         micro_batch_size=micro, impl="torch")
    dp_rank = mesh["dp"].get_local_rank()
    rows = slice(dp_rank * share, (dp_rank + 1) * share)
    return train_parallel(pm, cfg, steps, rows=rows, micro=micro, corrupt=corrupt, batch=batch)


def train_parallel(pm, cfg: ModelConfig, steps=STEPS, rows=slice(None), micro=0, corrupt=None,
                   batch=BATCH) -> dict:
    """The harness's training loop on a parallelized model: this rank's ``rows`` of every global
    batch, clip 1.0, AdamW. ``corrupt(pm)``, when given, runs after each backward and before the
    clip: a negative control's deliberately wrong gradients."""
    optimizer = build_optimizer_for(pm, steps)
    losses, head_losses, grad_norms, grads = [], [], [], None
    for window in batches(cfg, steps, batch):
        targets, scales = _targets(cfg, window)  # scales over the GLOBAL batch
        loss, stats = pm.forward_backward(window[rows, :-1], targets[:, rows], scales, micro)
        if corrupt is not None:
            corrupt(pm)
        if grads is None:
            grads = full_params(pm.named_parameters(), grads=True)
        grad_norms.append(pm.clip_grad_norm_(1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        head_losses.append((stats.loss_sum / stats.n_valid.clamp(min=1)).tolist())
    params = full_params(pm.named_parameters())
    return {"losses": losses, "params": params, "head_losses": head_losses, "grad_norms": grad_norms,
            "grads": grads,
            "owned": sorted(params), "stage_layers": [s.trunk_keys for s in pm.stages]}


def build_optimizer_for(pm, steps):
    """AdamW over the parallel model's parameters, built as ``reference_run`` builds its own: the
    loop clips and steps by hand (not ``pm.optimizer_step``) to mirror the reference step for step."""
    holder = torch.nn.Module()
    holder.params = torch.nn.ParameterList(list(pm.parameters()))
    return build_optimizer(holder, _train_cfg(steps), "cpu")


def merged_params(results, key: str = "params") -> dict:
    """Every rank's parameters (``key="grads"``: first-step gradients) in one dict: under pp a
    rank returns only its own stages'."""
    params = {}
    for result in results:
        params.update(result[key])
    return params


def runtime_error_of(fn, *args, **kwargs) -> str:
    """The message of the RuntimeError ``fn(*args, **kwargs)`` raises, or "no error": for the
    controls showing that a run without one of megatrain's safeguards fails loudly on every rank
    instead of silently losing gradients."""
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:
        return str(err)
    return "no error"


# ---- forked workers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, kwargs, results):
    code = 0
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from megatrain.parallel import init_distributed
        init_distributed(backend="gloo", timeout_s=120)
        # plain pickle: the queue's ForkingPickler would share tensors by fd, dead once we exit
        results.put((rank, True, pickle.dumps(fn(rank, *args, **kwargs))))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
        code = 1
    finally:
        results.close()
        results.join_thread()
        os._exit(code)


def run_ranks(world_size: int, fn, /, *args, timeout: float = 240.0, **kwargs) -> list:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` forked gloo ranks; results in rank order.

    ``timeout`` (seconds for all ranks together) is run_ranks' own keyword and never reaches
    ``fn``; ``world_size`` and ``fn`` are positional-only, so ``fn`` may take keywords of those
    names.
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise TimeoutError(f"{world_size - len(out)} of {world_size} ranks gave no result "
                                   f"within {timeout:.0f} s (ranks done: {sorted(out)})") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()  # only our own children, by handle
                p.join()
    return [out[r] for r in range(world_size)]


def assert_matches(reference, result, loss_rtol=1e-6, param_tol=1e-4, norm_rtol=1e-5, names=None,
                   grad_tol=1e-6, grads=True):
    """Per-step losses, gradient norms, the first step's gradients (where the run recorded them)
    and every (listed) parameter against the reference.

    Losses are float32 sums of n_future head means (~18 here, where one float32 ulp is 1.9e-6),
    so they are compared relatively: 1e-6 allows a last-bit difference from a reordered
    reduction, nothing more. The gradient norm catches gradient *scale* errors (e.g. averaging
    instead of summing over dp) that AdamW's scale invariance would hide from the parameters.
    """
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-30)  # noqa: E731
    loss_err = max(rel(a, b) for a, b in zip(reference["losses"], result["losses"]))
    assert loss_err <= loss_rtol, (f"losses differ by {loss_err:.3e} (relative) > {loss_rtol}: "
                                   f"reference {reference['losses']} vs parallel {result['losses']}")
    norm_err = max(rel(a, b) for a, b in zip(reference["grad_norms"], result["grad_norms"]))
    assert norm_err <= norm_rtol, (f"gradient norms differ by {norm_err:.3e} (relative) > {norm_rtol}: "
                                   f"reference {reference['grad_norms']} vs {result['grad_norms']}")
    names = names if names is not None else result["params"].keys()
    grad_err = 0.0
    if grads:  # False only for an engine that cannot hand its gradients out (DeepSpeed here)
        assert "grads" in result, "the run recorded no first-step gradients"
        compared = set(reference["grads"]) & set(names)
        got = set(result["grads"]) & set(names)
        assert got == compared and compared, (
            f"first-step gradients differ in which parameters have one: missing {sorted(compared - got)}, "
            f"extra {sorted(got - compared)}")
        for name in compared:
            err = (reference["grads"][name] - result["grads"][name]).abs().max().item()
            assert err <= grad_tol, f"first-step gradient of {name} differs by {err:.3e} > {grad_tol}"
            grad_err = max(grad_err, err)
    worst, worst_name = 0.0, None
    for name in names:
        err = (reference["params"][name] - result["params"][name]).abs().max().item()
        if err >= worst:
            worst, worst_name = err, name
    assert worst <= param_tol, f"parameter {worst_name} differs by {worst:.3e} > {param_tol}"
    return {"loss_rel": loss_err, "norm_rel": norm_err, "param_abs": worst, "grad_abs": grad_err}


def assert_comparison_catches(reference, result, grads=True):
    """Negative control: ``result`` comes from a deliberately wrong run (e.g. gradients corrupted
    after backward), and ``assert_matches``, with the very tolerances the equivalence tests pass
    under, must reject it. A comparison that cannot fail proves nothing."""
    with pytest.raises(AssertionError, match="differ"):
        assert_matches(reference, result, grads=grads)

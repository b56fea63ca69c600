"""The GPU check: fused linear + cross-entropy table and the 1.3B paper model's training step.

On a bare machine with one H100 / H200 (meant to take under 8 minutes; not yet timed on one),
from the repository root:

    bash install.sh
    .venv/bin/python -m pip uninstall -y torch
    .venv/bin/python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    .venv/bin/python -m pip install triton
    .venv/bin/python benchmarks/gpu_check.py          # prints both tables, appends them to docs/benchmarks.md

``install.sh`` installs the CPU torch wheel; the two pip lines replace it with the CUDA 12.8 build
and make sure Triton is there. Optional comparisons are used when importable
(``pip install liger-kernel cut-cross-entropy xformers``; check that none of them replaces torch).

1. Fused linear + cross-entropy, bf16, fwd+bwd, T x D x V = 16384x4096x32000, 16384x4096x128256,
   65536x4096x32000 (``benchmarks/fused_ce.py``'s providers and measurement: median ms and extra
   peak memory, each against the GEMM floor of the same run; not the chunked torch path, which is
   the CPU one), plus this check's own rows: the Triton path with each of its two gradient
   schemes forced ("rows": 3 GEMM-equivalents; "tiles": 4, less traffic; the plain row is the
   one it picks) and with a 256 MiB working-buffer cap instead of 16 MiB, to show the cap's
   price. Each shape's kernel is first judged against a float64 truth on a 256-row slice.
2. One training step of ``configs/paper/1.3b_n1.yaml`` and ``1.3b_n4.yaml`` on one GPU
   (2 x 4096 tokens, one micro-batch, bf16 autocast, AdamW, random tokens), with
   ``train.compile`` off and on, and with ``model.attention=xformers`` when xformers imports:
   median ms, MFU and peak allocated memory. MFU = model FLOPs per step / time / the GPU's dense
   bf16 peak (989 TFLOP/s on H100 / H200 SXM; ``--peak-tflops`` for others). FLOPs are
   ``benchmarks/mtp_memory.py``'s count: 6 x tokens x (matmul parameters of every block, heads
   included, + n_future x dim x vocab for the unembedding used once per head) + PaLM's attention
   term, so n_future=4 is credited with its extra unembeddings. torch's deterministic algorithms
   (on in ``megatrain train`` by default, ``train.deterministic``) are off unless
   ``--deterministic``.

``--cpu-smoke`` runs the same code at tiny sizes on CPU (the Triton kernels in the interpreter) so
that the script is tested without a GPU; its numbers mean nothing. Without CUDA and without
``--cpu-smoke`` it exits with status 1 and says what to install.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fused_ce, machine, mtp_memory

import fused_ce  # noqa: E402  (benchmarks/fused_ce.py)
import torch  # noqa: E402
from machine import machine_name  # noqa: E402
from mtp_memory import step_flops  # noqa: E402

NO_CUDA = ("benchmarks/gpu_check.py needs a CUDA GPU and found none (torch {version}). Install the "
           "CUDA build first: .venv/bin/python -m pip uninstall -y torch && .venv/bin/python -m pip "
           "install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && "
           ".venv/bin/python -m pip install triton. To exercise this script on CPU: "
           "python benchmarks/gpu_check.py --cpu-smoke")
PAPER_CONFIGS = {1: REPO / "configs/paper/1.3b_n1.yaml", 4: REPO / "configs/paper/1.3b_n4.yaml"}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
EXTRA_CAPS_MIB = (256,)  # Triton rows with a larger working-buffer cap than the default


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in DENSE_BF16_TFLOPS.items() if key in name), None)


# ---- 1. fused linear + cross-entropy -----------------------------------------------------------

def _triton_with(cap_mib=None, scheme=None):
    """The Triton path with its working-buffer cap and/or gradient scheme set for the call (the
    forward is where the gradients and their chunk buffers are formed; the backward only
    scales them)."""
    def run(hidden, weight, targets):
        from megatrain.kernels import fused_linear_cross_entropy, triton_linear_ce
        saved = triton_linear_ce.FUSED_BUFFER_CAP_BYTES, triton_linear_ce.GRADIENT_SCHEME
        if cap_mib is not None:
            triton_linear_ce.FUSED_BUFFER_CAP_BYTES = cap_mib << 20
        if scheme is not None:
            triton_linear_ce.GRADIENT_SCHEME = scheme
        try:
            return fused_linear_cross_entropy(hidden, weight, targets, impl="triton")
        finally:
            triton_linear_ce.FUSED_BUFFER_CAP_BYTES, triton_linear_ce.GRADIENT_SCHEME = saved
    return run


def ce_providers(device, interpret, caps_mib=EXTRA_CAPS_MIB):
    providers = fused_ce.make_providers(device, interpret)
    if device == "cuda":
        # the CPU path: float32 GEMMs without tensor cores, ~1 s a step at 65536 x 32000; it would
        # take a large share of the time budget and measures nothing the GPU run is for
        providers.pop("megatrain torch (chunked)", None)
    if "megatrain triton" in providers:  # "auto" picks one of these two per shape
        for scheme in ("rows", "tiles"):
            providers[f"megatrain triton ({scheme})"] = _triton_with(scheme=scheme)
        for mib in caps_mib:
            providers[f"megatrain triton (cap {mib} MiB)"] = _triton_with(cap_mib=mib)
    return providers


def ce_table(device, dtype, shapes, repeats, interpret, caps_mib=EXTRA_CAPS_MIB):
    providers = ce_providers(device, interpret, caps_mib)
    rows = []
    for shape in shapes:
        rows += fused_ce.bench_shape(shape, dtype, device, providers, repeats, interpret)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return fused_ce.table(rows)


# ---- 2. training step --------------------------------------------------------------------------

def train_cases(smoke: bool, xformers: bool):
    """(n_future, compile, attention) of each training row."""
    cases = [(n, compile_, "sdpa") for n in (1, 4) for compile_ in (False, True)]
    if smoke:  # a cold torch.compile of a block takes 10-20 s on CPU: not for a smoke test
        cases = [c for c in cases if not c[1]]
    if xformers:
        cases += [(n, False, "xformers") for n in (1, 4)]
    return cases


def train_config(n_future, compile_, attention, smoke, batch, seq_len):
    from megatrain.config import load_config
    overrides = [f"train.compile={str(compile_).lower()}", f"model.attention={attention}",
                 f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
                 f"data.seq_len={seq_len}"]
    if smoke:  # the embedded tiny model's shape, with a fixed vocabulary (no dataset here)
        overrides += [f"model.n_future={n_future}", "model.vocab_size=512", "train.device=cpu",
                      "train.dtype=fp32"]
        return load_config(None, overrides)
    return load_config(PAPER_CONFIGS[n_future], overrides)


def time_train_step(cfg, device, warmup, steps):
    """Median ms of ``steps`` optimizer steps after ``warmup`` (compilation, autotuning), peak
    allocated bytes during the timed steps, the last loss, and the model's FLOPs per step."""
    from megatrain.model.mtp import MTPTransformer
    from megatrain.mtp_loss import build_head_targets
    from megatrain.parallel.engine import build_engine
    from megatrain.parallel.topology import ParallelDims
    from megatrain.trainer import head_scales

    started = time.perf_counter()
    m, t = cfg.model, cfg.train
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    engine, n_params = build_engine(cfg, ParallelDims(1, 1, 1, 1), None, device, autocast_dtype)
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, m.vocab_size, (t.batch_size, cfg.data.seq_len + 1), generator=gen)
    window = window.to(device)
    targets = build_head_targets(window, m.n_future)
    scales = head_scales((targets != -100).flatten(1).sum(1).cpu(), [1.0] * m.n_future)
    times, loss = [], float("nan")
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss, _ = engine.forward_backward(window[:, :-1], targets, scales, t.micro_batch_size)
        engine.optimizer_step(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    with torch.device("meta"):  # FLOPs from the full model's parameter names and shapes
        meta = MTPTransformer(m, max_seq_len=cfg.data.seq_len)
    flops = step_flops(meta, SimpleNamespace(batch=t.batch_size, seq_len=cfg.data.seq_len,
                                             layers=m.n_layers, dim=m.dim, vocab=m.vocab_size,
                                             n_future=m.n_future))
    del engine
    return dict(ms=statistics.median(times), peak=peak, loss=float(loss), flops=flops,
                params=n_params, seconds=time.perf_counter() - started)


def train_table(device, smoke, warmup, steps, batch, seq_len, peak_tf):
    try:
        import xformers.ops  # noqa: F401
        xformers = device.type == "cuda"
    except ImportError:
        xformers = False
        print("xformers not importable: no xformers rows")
    lines = ["| n_future | train.compile | attention | params | ms / step | TFLOP/s | MFU | "
             "peak GiB | loss |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for n, compile_, attention in train_cases(smoke, xformers):
        cfg = train_config(n, compile_, attention, smoke, batch, seq_len)
        try:
            r = time_train_step(cfg, device, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            lines.append(f"| {n} | {compile_} | {attention} | | OOM | | | | |")
            continue
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tflops = r["flops"] / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tflops / peak_tf:.1f}%" if peak_tf else "n/a"
        lines.append(f"| {n} | {compile_} | {attention} | {r['params'] / 1e9:.3f}B | {r['ms']:.1f} | "
                     f"{tflops:.1f} | {mfu} | {r['peak'] / 2**30:.2f} | {r['loss']:.3f} |")
        print(f"{lines[-1]}  [{r['seconds']:.0f} s]", flush=True)
    return "\n".join(lines)


# ---- the report --------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on CPU (Triton in the interpreter): tests the script only")
    parser.add_argument("--skip-ce", action="store_true", help="no fused cross-entropy table")
    parser.add_argument("--skip-train", action="store_true", help="no training-step table")
    parser.add_argument("--repeats", type=int, default=5, help="fused CE: timing repeats")
    parser.add_argument("--steps", type=int, default=5, help="training: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="training: untimed first steps")
    parser.add_argument("--deterministic", action="store_true",
                        help="training rows with torch.use_deterministic_algorithms, as the trainer")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: 989 on H100/H200)")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        # before megatrain's Triton kernels are first imported (the fused-CE rows import them)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
        device, dtype, shapes = torch.device("cpu"), torch.float32, fused_ce.SMOKE_SHAPES
        batch, seq_len, caps = 2, 32, (1,)
    elif torch.cuda.is_available():
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, fused_ce.GPU_SHAPES
        batch, seq_len, caps = 2, 4096, EXTRA_CAPS_MIB
    else:
        sys.exit(NO_CUDA.format(version=torch.__version__))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    name = machine_name()
    peak_tf = peak_tflops(name, args.peak_tflops)
    started = time.perf_counter()
    sections = []
    if not args.skip_ce:
        ce = ce_table(device.type, dtype, shapes, args.repeats, interpret, caps)
        sections.append(f"Fused linear + cross-entropy, {str(dtype).removeprefix('torch.')}, "
                        f"fwd+bwd; median ms; extra peak = peak allocated above inputs, weights "
                        f"and their grads.\n\n{ce}")
        print(sections[-1], flush=True)
        print(f"[{time.perf_counter() - started:.0f} s]", flush=True)
    if not args.skip_train:
        if args.deterministic:  # as megatrain.trainer.setup does for train.deterministic=true
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        what = ("the default tiny model" if args.cpu_smoke
                else "configs/paper/1.3b_n{1,4}.yaml")
        tr = train_table(device, args.cpu_smoke, args.warmup, args.steps, batch, seq_len, peak_tf)
        sections.append(f"Training step of {what}, {batch} x {seq_len} tokens, one micro-batch, "
                        f"AdamW, random tokens; median of {args.steps} steps after {args.warmup}; "
                        f"MFU against {peak_tf or '?'} TFLOP/s dense bf16, counting n_future "
                        f"unembeddings.\n\n{tr}")
        print(sections[-1], flush=True)
    import triton
    title = ("CPU smoke of benchmarks/gpu_check.py (not a benchmark)" if args.cpu_smoke else
             f"GPU check (benchmarks/gpu_check.py), {name}, {datetime.date.today().isoformat()}")
    report = (f"### {title}\n\nCommand: `python benchmarks/gpu_check.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`; torch {torch.__version__}, "
              f"triton {triton.__version__}; {time.perf_counter() - started:.0f} s in all.\n\n"
              + "\n\n".join(sections) + "\n")
    print(report)
    if args.out:
        args.out.write_text(report)
    if device.type == "cuda" and not args.no_append:
        with (REPO / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n" + report)
        print("appended to docs/benchmarks.md")


if __name__ == "__main__":
    main()

"""Throughput and per-rank peak memory of `megatrain train` in each parallel layout, n_future 1 and 4.

CPU mode (default): the tiny model (6 layers, dim 128, 4 attention heads, 8x128 tokens per step)
runs a few steps in each layout, for n_future 1 and 4, every layout in fresh processes:

    single      1 process
    dp2         2 processes, FSDP2
    tp2         2 processes, tensor parallel
    pp2         2 processes, pipeline parallel (1f1b)
    tp2pp2      4 processes
    dp2tp2pp2   8 processes

tokens/s is the median over the steps after the first two of the trainer's own ``tokens_per_s``
(logged by rank 0 only; every step ends in a gradient-norm all-reduce, so rank 0's step time is the
job's). CPU numbers are relative only: all processes share the machine's cores (OMP_NUM_THREADS=1
each), so 8 ranks on 2 cores measure overheads, not scaling.

Per-rank memory: ``metrics.jsonl`` carries rank 0's peak only, so each rank runs a small worker
(this file with ``--rank-worker``) that calls ``megatrain.trainer.train`` -- the function
``megatrain train`` calls -- with a ``should_stop`` callback. The callback is polled on every rank
after every step; it records that rank's peak (max RSS on CPU, max allocated on GPU, the same
``peak_memory_bytes`` the trainer logs) and, after the last step, ends the run before the
end-of-run checkpoint, which a benchmark does not need (a 1.3B model's is ~20 GB of disk writes).
Under torchrun the trainer all-reduces the callback's answer each step, outside the timed region.
"peak" is the process's peak RSS: on CPU it includes the ~0.4 GiB that importing torch costs, so
the table also gives the growth above the worker's RSS after imports.

GPU mode (``--gpu``, one CUDA device; exits with a message when none is visible): one process,
``train.device=cuda`` (bf16 autocast is then automatic), configs/paper/1.3b_n1.yaml and
configs/paper/1.3b_n4.yaml at ``data.seq_len=4096`` on the embedded default corpus, a few steps of
``--gpu-batch`` sequences (micro-batches of ``--gpu-micro-batch``), deterministic mode off. It
reports tokens/s, MFU against 989 TFLOP/s (H100/H200 SXM dense bf16 peak, ``--peak-tflops`` for
other parts) and peak memory, and the n_future=4 / n_future=1 step-time ratio beside its
arithmetic lower bound: the step's matmul FLOPs with n unembeddings over those with one (the same
count as ``benchmarks/mtp_memory.py::step_flops``; both configs have 24 transformer layers, so the
extra heads' unembeddings are the only difference).

    python benchmarks/parallel.py                                  # CPU, all layouts, appends docs
    python benchmarks/parallel.py --no-append --layouts single tp2 --n 4 --steps 5
    python benchmarks/parallel.py --gpu                            # on a CUDA machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
H100_BF16_DENSE_TFLOPS = 989.0

LAYOUTS = {  # name: (processes, overrides)
    "single": (1, []),
    "dp2": (2, ["parallel.dp=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "dp2tp2pp2": (8, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b"]),
}
QUIET = ["train.eval_every=0", "checkpoint.every=0", "checkpoint.resume=false",
         "logging.progress=false", "logging.tensorboard=false"]


class _LastStepDone(Exception):
    """Raised by the worker's should_stop after the last step: skips the end-of-run checkpoint."""


def rank_worker(out_dir: Path, config: str | None, overrides: list[str]) -> None:
    """One rank of a benchmark run: train, recording this rank's peak memory after every step."""
    from megatrain.config import load_config
    from megatrain.metrics import peak_memory_bytes
    from megatrain.parallel import shutdown_distributed
    from megatrain.spec import resolve
    from megatrain.trainer import train

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = load_config(config, overrides)
    device, _ = resolve(cfg).device(int(os.environ.get("LOCAL_RANK", "0")))
    peaks: list[int] = []

    def record_and_stop_after_last_step(step: int) -> bool:
        peaks.append(peak_memory_bytes(device))
        if step == cfg.train.steps:
            raise _LastStepDone
        return False

    try:
        train(cfg, should_stop=record_and_stop_after_last_step)
    except _LastStepDone:
        pass
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_bytes": peaks[-1], "start_bytes": rss_after_imports,
         "device": device.type}))
    shutdown_distributed()  # as `megatrain train` leaves


def run_layout(nproc: int, config: str | None, overrides: list[str]) -> dict:
    """Launch one run in fresh processes; return rank 0's step throughputs and every rank's peak."""
    with tempfile.TemporaryDirectory(prefix="megatrain-bench-") as tmp:
        tmp = Path(tmp)
        worker = [str(Path(__file__).resolve()), "--rank-worker", str(tmp),
                  *(["--config", config] if config else []), "--", *overrides,
                  f"run.dir={tmp / 'run'}"]
        if nproc == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={nproc}", *worker]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"run failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stderr[-4000:]}")
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        ranks = sorted((json.loads((tmp / f"rank{r}.json").read_text()) for r in range(nproc)),
                       key=lambda r: r["rank"])
    throughputs = [r["tokens_per_s"] for r in records if "loss" in r]
    return {"tokens_per_s": statistics.median(throughputs[2:] or throughputs),
            "measured_steps": len(throughputs[2:] or throughputs),
            "peak_bytes": [r["peak_bytes"] for r in ranks],
            "start_bytes": [r["start_bytes"] for r in ranks],
            "wall_s": wall}


# ---------------------------------------------------------------- CPU: layouts

def cpu_main(args) -> None:
    model = [f"model.n_layers={args.layers}", f"model.dim={args.dim}", f"model.n_heads={args.heads}",
             f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
             f"train.steps={args.steps}", "train.device=cpu", *QUIET]
    load = os.getloadavg()[0]  # other users of the shared cores skew CPU timings: record it
    rows = []
    for name in args.layouts:
        nproc, parallel = LAYOUTS[name]
        if "parallel.pp=2" in parallel:
            parallel = parallel + [f"parallel.microbatches={args.microbatches}"]
        for n in args.n:
            row = run_layout(nproc, None, model + parallel + [f"model.n_future={n}"])
            row.update(layout=name, nproc=nproc, n_future=n)
            rows.append(row)
            print(f"  {name:10s} n={n}: {row['tokens_per_s']:8.0f} tok/s, peak per rank "
                  f"{'/'.join(f'{b / 2**20:.0f}' for b in row['peak_bytes'])} MiB "
                  f"({row['wall_s']:.0f} s wall)", flush=True)
    table = format_cpu_table(rows, args, load)
    print(table)
    append(table, args)


def format_cpu_table(rows: list[dict], args, load: float) -> str:
    base = {r["n_future"]: r for r in rows if r["layout"] == "single"}
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [f"### Parallel layouts: throughput and peak memory per rank, CPU ({datetime.date.today()}, "
             f"{machine_name()})",
             "",
             f"Command: `{' '.join(['python benchmarks/parallel.py', *sys.argv[1:]])}`; `megatrain train`, "
             f"{args.layers} layers (trunk L-n + n heads), dim {args.dim}, {args.heads} attention heads, "
             f"global batch {args.batch}x{args.seq_len} tokens, pp with 1f1b and "
             f"{args.microbatches} microbatches; tokens/s = median of rank 0's steps 3..{args.steps}. "
             f"**CPU numbers are relative only**: every process shares the same cores "
             f"(OMP_NUM_THREADS=1), so more ranks do not mean more compute; 1-minute load average "
             f"{load:.1f} at the start. Peak = each rank's max "
             f"RSS after its last step (before any checkpoint), read by a per-rank worker; it includes "
             f"~{mib(statistics.median(s for r in rows for s in r['start_bytes']))} MiB of Python + "
             f"torch, hence the growth column (peak minus RSS after imports).",
             "",
             "| layout | procs | n_future | tokens/s | vs 1 process | peak RSS per rank, rank 0 first (MiB) "
             "| max over ranks (MiB) | growth above imports per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = (f"{r['tokens_per_s'] / base[r['n_future']]['tokens_per_s']:.2f}"
              if r["n_future"] in base else "-")
        growth = [p - s for p, s in zip(r["peak_bytes"], r["start_bytes"])]
        lines.append(f"| {r['layout']} | {r['nproc']} | {r['n_future']} | {r['tokens_per_s']:.0f} | {vs} | "
                     f"{' / '.join(mib(b) for b in r['peak_bytes'])} | {mib(max(r['peak_bytes']))} | "
                     f"{' / '.join(mib(b) for b in growth)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- GPU: 1.3B, one device

def step_flops_per_token(config: str, seq_len: int) -> float:
    """Matmul FLOPs per trained token (forward + backward = 3x forward; PaLM-style attention).

    As in benchmarks/mtp_memory.py::step_flops: the shared unembedding runs once per head, so it
    counts n_future times. The model is built on the meta device, so this runs without a GPU.
    """
    import torch

    from megatrain.config import load_config
    from megatrain.model.mtp import MTPTransformer

    cfg = load_config(config, [f"data.seq_len={seq_len}"]).model
    with torch.device("meta"):
        model = MTPTransformer(cfg, seq_len)
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and not n.startswith(("tok_embeddings", "output")))
    unembedding = cfg.n_future * cfg.dim * cfg.vocab_size
    attention = 2 * cfg.n_layers * seq_len * cfg.dim  # QK^T and AV, causal-unmasked count
    return 6.0 * (blocks + unembedding + attention)


def gpu_main(args) -> None:
    import torch

    from megatrain.config import load_config

    if not torch.cuda.is_available():
        sys.exit("benchmarks/parallel.py --gpu needs a CUDA device and none is visible "
                 "(torch.cuda.is_available() is False); run it on a GPU machine, or drop --gpu "
                 "for the CPU layout benchmark.")
    device_name = torch.cuda.get_device_name()
    rows = []
    for config in args.gpu_configs:
        overrides = [f"data.seq_len={args.gpu_seq_len}", f"train.batch_size={args.gpu_batch}",
                     f"train.micro_batch_size={args.gpu_micro_batch}", f"train.steps={args.steps}",
                     "train.device=cuda", "train.deterministic=false", "train.warmup_steps=1", *QUIET]
        row = run_layout(1, config, overrides)
        row.update(config=config, n_future=load_config(config, []).model.n_future,
                   flops_per_token=step_flops_per_token(config, args.gpu_seq_len))
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (args.peak_tflops * 1e12)
        rows.append(row)
        print(f"  {config}: {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.1%}, "
              f"peak {row['peak_bytes'][0] / 2**30:.1f} GiB ({row['wall_s']:.0f} s wall)", flush=True)
    table = format_gpu_table(rows, args, device_name)
    print(table)
    append(table, args)


def format_gpu_table(rows: list[dict], args, device_name: str) -> str:
    base = min(rows, key=lambda r: r["n_future"])
    tokens = args.gpu_batch * args.gpu_seq_len
    lines = [f"### One-GPU throughput and MFU, 1.3B n_future=1 vs 4 ({datetime.date.today()}, {device_name})",
             "",
             f"Command: `{' '.join(['python benchmarks/parallel.py', *sys.argv[1:]])}`; `megatrain train`, "
             f"one process, bf16 autocast, {args.gpu_batch}x{args.gpu_seq_len} tokens per step in "
             f"micro-batches of {args.gpu_micro_batch}, AdamW, median of steps 3..{args.steps}. MFU = "
             f"tokens/s x matmul FLOPs per token (6 x (block params + n_future x dim x vocab) + "
             f"12 x layers x seq x dim) / {args.peak_tflops:.0f} TFLOP/s. Lower bound of the step-time "
             f"ratio = FLOPs vs n_future={base['n_future']} (the extra heads' unembeddings).",
             "",
             f"| config | n_future | tokens/s | step (s) | MFU | peak allocated (GiB) | "
             f"step time vs n={base['n_future']} | FLOPs vs n={base['n_future']} (lower bound) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['n_future']} | {r['tokens_per_s']:.0f} | "
                     f"{tokens / r['tokens_per_s']:.3f} | {r['mfu']:.1%} | "
                     f"{r['peak_bytes'][0] / 2**30:.1f} | "
                     f"{base['tokens_per_s'] / r['tokens_per_s']:.3f} | "
                     f"{r['flops_per_token'] / base['flops_per_token']:.3f} |")
    return "\n".join(lines)


def append(table: str, args) -> None:
    if not args.no_append:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="n_future values")
    parser.add_argument("--steps", type=int, default=8, help="steps per run; the first two are not timed")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    parser.add_argument("--microbatches", type=int, default=4, help="pipeline microbatches (pp layouts)")
    parser.add_argument("--gpu", action="store_true", help="one-GPU 1.3B n_future 1 vs 4 (see above)")
    parser.add_argument("--gpu-configs", nargs="+",
                        default=["configs/paper/1.3b_n1.yaml", "configs/paper/1.3b_n4.yaml"])
    parser.add_argument("--gpu-seq-len", type=int, default=4096)
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-micro-batch", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="dense bf16 peak for MFU (989 = H100/H200 SXM)")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args.rank_worker, args.config, args.overrides)
    elif args.gpu:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()

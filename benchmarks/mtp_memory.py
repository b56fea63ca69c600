"""Peak memory and step time of multi-token training for n_future = 1, 2, 4, 8 at equal size.

Each configuration runs in a fresh process (max RSS only grows), on random tokens, for a few
training steps (trunk forward, heads, backward, AdamW). Two loss modes are compared:
``sequential`` (megatrain's memory-efficient heads) and ``naive`` (every head's logits alive at
once, plain autograd), so the table shows what the sequential scheme saves.

CPU: peak = max resident set size of the process; GPU: torch.cuda.max_memory_allocated.

    python benchmarks/mtp_memory.py                 # prints the table, appends docs/benchmarks.md
    python benchmarks/mtp_memory.py --no-append --steps 3 --n 1 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent


def run_one(args) -> dict:
    import torch

    from megatrain.config import ModelConfig
    from megatrain.metrics import peak_memory_bytes
    from megatrain.model.mtp import MTPTransformer, count_parameters
    from megatrain.mtp_loss import build_head_targets, mtp_loss, mtp_loss_naive

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=args.layers, n_future=args.n_future, dim=args.dim, n_heads=args.heads,
                      vocab_size=args.vocab)
    model = MTPTransformer(cfg, args.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    window = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    targets = build_head_targets(window, args.n_future)
    scales = 1.0 / (targets != -100).flatten(1).sum(1).float()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast or torch.autocast("cpu", enabled=False):
            hidden = model.trunk(window[:, :-1])
            if args.mode == "sequential":
                loss, _ = mtp_loss(model, hidden, targets, scales)
            else:
                loss = mtp_loss_naive(model, hidden, targets, scales)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"n_future": args.n_future, "mode": args.mode, "params": count_parameters(model),
            "flops": step_flops(model, args),
            "peak_bytes": peak_memory_bytes(device), "step_s": statistics.median(times[1:] or times),
            "device": machine_name()}


def step_flops(model, args) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward; PaLM-style attention).

    The shared unembedding is used once per head, so it counts n_future times: that is the extra
    arithmetic multi-token prediction pays, and the lower bound of its step-time ratio.
    """
    tokens = args.batch * args.seq_len
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and not n.startswith(("tok_embeddings", "output")))
    unembedding = args.n_future * args.dim * args.vocab
    attention = 2 * args.layers * args.seq_len * args.dim  # QK^T and AV, causal-unmasked count
    return 6.0 * tokens * (blocks + unembedding + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["sequential", "naive"])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", help="use the CPU even if a GPU is visible")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n-future", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return

    rows = []
    shared = ["--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
              "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
              "--steps", str(args.steps)] + (["--cpu"] if args.cpu else [])
    for mode in args.modes:
        for n in args.n:
            out = subprocess.run([sys.executable, __file__, "--child", "--n-future", str(n),
                                  "--mode", mode, *shared], check=True, capture_output=True,
                                 text=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {mode:10s} n={n}: {rows[-1]['peak_bytes'] / 2**20:8.1f} MiB, "
                  f"{rows[-1]['step_s']:.3f} s/step", flush=True)

    table = format_table(rows, args)
    print(table)
    if not args.no_append:
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + table + "\n")


def format_table(rows: list[dict], args) -> str:
    base = {r["mode"]: r for r in rows if r["n_future"] == min(args.n)}
    device = rows[0]["device"]
    lines = [f"### MTP peak memory and step time vs n_future ({datetime.date.today()}, {device})",
             "",
             f"Command: `python benchmarks/mtp_memory.py {' '.join(sys.argv[1:])}`; L={args.layers} "
             f"layers (trunk L-n), dim {args.dim}, vocab {args.vocab}, {args.batch}x{args.seq_len} "
             f"tokens, AdamW, median of {args.steps - 1} steps.",
             "",
             "| loss mode | n_future | params | peak memory (MiB) | vs n=1 | step (s) | vs n=1 "
             "| FLOPs vs n=1 (lower bound) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["mode"]]
        lines.append(f"| {r['mode']} | {r['n_future']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / b['peak_bytes']:.3f} | "
                     f"{r['step_s']:.3f} | {r['step_s'] / b['step_s']:.3f} | {r['flops'] / b['flops']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

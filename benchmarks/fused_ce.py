"""Fused linear + cross-entropy benchmark: ms (fwd+bwd) and extra peak memory per provider.

    python benchmarks/fused_ce.py                 # on a CUDA machine; appends to docs/benchmarks.md
    python benchmarks/fused_ce.py --cpu-smoke     # tiny CPU run of the plumbing (no file written)

Providers: the GEMM floor (the three matmuls: logits = H W^T, grad_H = G W, grad_W = G^T H),
torch eager (F.linear + F.cross_entropy on float32 logits), torch.compile of it, this repo's
Triton kernel, Liger-Kernel's fused linear CE and cut-cross-entropy when importable.
Time: median of triton.testing.do_bench (CUDA) / of wall-clock repeats (CPU smoke).
Extra memory: peak allocated during one fwd+bwd minus what was allocated before it (inputs,
weights) minus the size of the gradients of hidden and weight.
Before timing, the kernel is checked against a float64 truth on a slice of each shape
(megatrain.kernels.testing.judge: error <= 2x torch's own error in the same dtype).
"""

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megatrain.kernels import fused_linear_cross_entropy
from megatrain.kernels import testing as kt

GPU_SHAPES = [(16384, 4096, 32000), (16384, 4096, 128256), (65536, 4096, 32000)]  # T x D x V
SMOKE_SHAPES = [(96, 32, 500)]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def eager_loss(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def make_providers(device, interpret):
    """name -> (hidden, weight, targets) -> loss (to backprop from), or None for the floor."""
    providers = {"gemm floor (3 matmuls)": None, "torch eager": eager_loss}
    if device == "cuda":
        providers["torch.compile"] = torch.compile(eager_loss)
    if device == "cuda" or interpret:
        providers["megatrain triton"] = lambda h, w, t: fused_linear_cross_entropy(
            h, w, t, impl="triton")
    providers["megatrain torch (chunked)"] = lambda h, w, t: fused_linear_cross_entropy(
        h, w, t, impl="torch")
    # the comparison libraries last: a failure there must not cost megatrain's own rows
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            providers["liger-kernel"] = lambda h, w, t: liger(w, h, t)
        except Exception as err:  # noqa: BLE001 - not installed, or built for another triton
            print(f"liger-kernel not importable ({type(err).__name__}: {err}): skipped")
        try:
            from cut_cross_entropy import linear_cross_entropy
            providers["cut-cross-entropy"] = lambda h, w, t: linear_cross_entropy(h, w, t)
        except Exception as err:  # noqa: BLE001 - not installed, or built for another triton
            print(f"cut-cross-entropy not importable ({type(err).__name__}: {err}): skipped")
    return providers


def floor_step(hidden, weight, dlogits_out):
    """The three GEMMs of a fwd+bwd, with the same shapes and dtype; no softmax at all."""
    with torch.no_grad():
        logits = dlogits_out
        torch.mm(hidden, weight.t(), out=logits)  # (T, V) forward
        grad_hidden = logits @ weight             # (T, D)
        grad_weight = logits.t() @ hidden         # (V, D)
    return grad_hidden, grad_weight


def step_fn(loss_fn, hidden, weight, targets):
    if loss_fn is None:
        buf = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype,
                          device=hidden.device)
        return lambda: floor_step(hidden, weight, buf)

    def step():
        loss_fn(hidden, weight, targets).backward()
    return step


def time_ms(step, device, hidden, weight, repeats):
    if device == "cuda":
        from triton.testing import do_bench
        # rep is milliseconds of repeats: at ~20-80 ms a step, 100 per repeat gives enough samples
        # for a median that can tell 1.03x from 1.00x
        return do_bench(step, warmup=25, rep=repeats * 100, grad_to_none=[hidden, weight],
                        return_mode="median")
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_peak_mib(step, device, hidden, weight):
    if device != "cuda":
        return float("nan")
    hidden.grad = weight.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads = (hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size())
    return (torch.cuda.max_memory_allocated() - before - grads) / 2**20


def check_kernel(dim, vocab, dtype, device, interpret):
    """The kernel vs float64 truth on a 256-row slice of this shape (raises if off)."""
    impl = "triton" if (device == "cuda" or interpret) else "torch"
    case = kt.make_case(256 if device == "cuda" else 48, dim, vocab, dtype, device=device)
    result = kt.run(fused_linear_cross_entropy, case, "mean", impl=impl)
    true = kt.judge(result, case, "mean")
    assert int(result["n_correct"]) == int(true["n_correct"])
    return impl


def bench_shape(shape, dtype, device, providers, repeats, interpret):
    """One row per provider; a provider that fails gets a row naming its error instead of ending
    the shape (a GPU is lent for minutes: every row that can be measured counts)."""
    n_rows, dim, vocab = shape
    try:
        checked = check_kernel(dim, vocab, dtype, device, interpret)
        print(f"{n_rows}x{dim}x{vocab}: impl={checked} matches the float64 truth on a slice")
    except Exception as err:  # noqa: BLE001 - reported in the table, the timings still run
        print(f"{n_rows}x{dim}x{vocab}: the kernel check FAILED: {type(err).__name__}: {err}")
        providers = {(f"{k} (kernel check failed)" if "megatrain" in k else k): v
                     for k, v in providers.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n_rows, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) / dim**0.5).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (n_rows,), device=device, generator=gen)
    rows = []
    for name, loss_fn in providers.items():
        step = step_fn(loss_fn, hidden, weight, targets)
        try:
            ms = time_ms(step, device, hidden, weight, repeats)
            mib = extra_peak_mib(step, device, hidden, weight)
        except torch.cuda.OutOfMemoryError:
            ms = mib = float("nan")
            name += " (OOM)"
        except Exception as err:  # noqa: BLE001 - e.g. a comparison library built for another triton
            print(f"{n_rows}x{dim}x{vocab} {name} failed: {type(err).__name__}: {err}", flush=True)
            ms = mib = float("nan")
            name += f" (failed: {type(err).__name__})"
        rows.append((name, ms, mib))
        hidden.grad = weight.grad = None
    floor = rows[0][1]
    return [(f"{n_rows}x{dim}x{vocab}", name, ms, ms / floor, mib) for name, ms, mib in rows]


def table(rows):
    lines = ["| T x D x V | provider | ms | x floor | extra peak MiB |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {s} | {p} | {ms:.2f} | {r:.2f} | {mib:.0f} |" for s, p, ms, r, mib in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny CPU run to test this script (Triton via TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.cpu_smoke:
        device, dtype, shapes = "cpu", torch.float32, SMOKE_SHAPES
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device, dtype, shapes = "cuda", torch.bfloat16, GPU_SHAPES
    else:
        sys.exit("benchmarks/fused_ce.py needs a CUDA GPU (none found). To test the script's "
                 "plumbing on CPU: TRITON_INTERPRET=1 python benchmarks/fused_ce.py --cpu-smoke")
    providers = make_providers(device, interpret)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, dtype, device, providers, args.repeats, interpret)
    machine = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke (not a benchmark)"
    import triton
    header = (f"## Fused linear + cross-entropy, {str(dtype).replace('torch.', '')}, fwd+bwd — "
              f"{machine}, {datetime.date.today().isoformat()}\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}; median ms; extra peak = "
              "peak allocated above inputs, weights and their grads.\n")
    text = header + "\n" + table(rows) + "\n"
    print(text)
    if device == "cuda" and not args.no_append:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        if not DOCS.exists():
            DOCS.write_text("# Benchmarks\n\n")
        with DOCS.open("a") as f:
            f.write("\n" + text)
        print(f"appended to {DOCS}")


if __name__ == "__main__":
    main()

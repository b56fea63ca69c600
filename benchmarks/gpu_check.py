"""The GPU check: what megatrain measures on a lent GPU, in one budgeted run.

Run it through ``bash benchmarks/gpu_check.sh`` (which installs the carried wheels and megatrain
itself first; see docs/benchmarks.md, "When a GPU is lent"). Sections, each independent (one that
fails is recorded with its error and the next runs), rows skipped with a reason once the budget
(``--budget-s``) would not hold them:

1. fused linear + cross-entropy, bf16 fwd+bwd at 16384x4096x32000, 16384x4096x128256 and
   65536x4096x32000: the GEMM floor, torch eager, torch.compile, megatrain's Triton path (the
   gradient scheme it picks, each scheme forced, and a 256 MiB working-buffer cap), Liger-Kernel
   and cut-cross-entropy where importable; each shape's kernel first judged against a float64
   truth on a 256-row slice (``benchmarks/fused_ce.py``);
2. one training step of the 1.3B paper model, n_future 1 and 4, compile off and on: ms, MFU,
   peak memory (``gpu_check_train.py``);
3. the memory planner against the device (``gpu_check_memory.py``);
4. plain vs self-speculative decoding cost per forward at the 1.3B shape (``gpu_check_decode.py``).

``--smoke`` runs only the 30-second check that the machine can do the rest: CUDA visible, one
tiny MTP training step in bf16 with the Triton loss, one speculative generation.
``--cpu-smoke`` runs everything at tiny sizes on the CPU (the Triton kernels in the interpreter),
sections that need CUDA skipped with the reason: that is how the script is tested; its numbers
mean nothing. Without CUDA and without ``--cpu-smoke`` it exits with status 1.

Files in ``--out-dir`` (rewritten after every row, so a run cut short keeps what it measured):
``report.md`` (the tables), ``results.json`` (the raw numbers), ``memory_profile.json``
(section 3's profile). On CUDA the finished report is appended to docs/benchmarks.md unless
``--no-append``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

import torch  # noqa: E402
from gpu_check_report import Budget, Report  # noqa: E402
from machine import machine_name  # noqa: E402

NO_CUDA = ("benchmarks/gpu_check.py needs a CUDA GPU and found none (torch {version}). On a lent GPU "
           "machine run `bash benchmarks/gpu_check.sh` (docs/benchmarks.md, 'When a GPU is lent'); to "
           "exercise this script on CPU: python benchmarks/gpu_check.py --cpu-smoke")
SECTIONS = ("ce", "train", "memory", "decode")
EXTRA_CAPS_MIB = (256,)  # Triton rows with a larger working-buffer cap than the default
COMPARISONS = ("liger-kernel", "cut-cross-entropy")
# rough, on an H100: the kernel check, every provider's timing, and on the first shape the cold
# compiles (megatrain's Triton kernels for sm_90: ~30 s; inductor; the comparison libraries' JIT)
CE_FIRST_SHAPE_SECONDS, CE_SHAPE_SECONDS = 120, 60


# ---- the smoke -----------------------------------------------------------------------------------

def smoke(device: torch.device) -> str:
    """One tiny MTP training step with the Triton loss (bf16 on CUDA) and one speculative
    generation; returns a one-line summary, raises on any failure."""
    from gpu_check_train import time_train_step, train_config

    from megatrain.inference.generate import Generator
    from megatrain.model.mtp import MTPTransformer

    started = time.perf_counter()
    impl, note = "triton", ""
    if device.type == "cpu" and _interpreter_problem():
        impl, note = "torch", f" (not the Triton loss: {_interpreter_problem()})"
    cfg = train_config(4, False, "sdpa", smoke=True, batch=2, seq_len=64, extra=[f"loss.impl={impl}"])
    if device.type == "cuda":
        cfg.train.device, cfg.train.dtype = "cuda", "bf16"
    step = time_train_step(cfg, device, warmup=0, steps=1)
    if not 0 < step["loss"] < 100:
        raise RuntimeError(f"the smoke training step's loss is {step['loss']}")
    with torch.device(device):
        model = MTPTransformer(cfg.model, max_seq_len=64).eval()
    out = Generator(model).generate([[1, 2, 3, 4], [5, 6]], 8, speculative=True)
    if [len(t) for t in out.tokens] != [8, 8]:
        raise RuntimeError(f"the smoke generation returned {out.tokens}")
    return (f"smoke ok on {machine_name()}: torch {torch.__version__}, triton {_triton_version()}, "
            f"one n_future=4 step with loss.impl={impl}{note} (loss {step['loss']:.3f}, "
            f"{step['ms']:.0f} ms), "
            f"one speculative generation ({out.tokens_per_forward:.2f} tokens/forward); "
            f"{time.perf_counter() - started:.1f} s")


def _interpreter_problem() -> str | None:
    """Why the Triton kernels cannot run in the CPU interpreter here (None: they can)."""
    from megatrain.kernels import interpreter_problem

    return interpreter_problem() if os.environ.get("TRITON_INTERPRET") == "1" else "TRITON_INTERPRET is not 1"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


# ---- 1. fused linear + cross-entropy -------------------------------------------------------------

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


def ce_providers(device: str, interpret: bool, caps_mib=EXTRA_CAPS_MIB) -> dict:
    import fused_ce

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
    # the comparison libraries last: a failure there must not cost megatrain's own rows
    providers.update({name: providers.pop(name) for name in COMPARISONS if name in providers})
    return providers


def ce_section(report: Report, budget: Budget, device: torch.device, smoke_sizes: bool,
               repeats: int) -> None:
    import fused_ce

    problem = _interpreter_problem() if device.type == "cpu" else None
    interpret = device.type == "cpu" and not problem
    dtype = torch.float32 if smoke_sizes else torch.bfloat16
    shapes = fused_ce.SMOKE_SHAPES if smoke_sizes else fused_ce.GPU_SHAPES
    providers = ce_providers(device.type, interpret, (1,) if smoke_sizes else EXTRA_CAPS_MIB)
    missing = [name for name in COMPARISONS if name not in providers]
    title = (f"**1. Fused linear + cross-entropy**, {str(dtype).removeprefix('torch.')}, fwd+bwd; median "
             f"ms; extra peak = peak allocated above inputs, weights and their grads."
             + (f" Not importable here (or no CUDA): {', '.join(missing)}." if missing else "")
             + (" cut-cross-entropy runs with its default gradient filtering (filter_eps='high'): it "
                "skips gradient entries below a threshold that the other rows compute."
                if "cut-cross-entropy" in providers else "")
             + (f" No Triton rows: {problem}." if problem else ""))
    rows, skipped = [], []
    for n, shape in enumerate(shapes):
        need = 5 if smoke_sizes else (CE_SHAPE_SECONDS if n else CE_FIRST_SHAPE_SECONDS)
        if not budget.allows(need):
            skipped.append(f"{'x'.join(map(str, shape))} {budget.skip_reason(need)}")
            continue
        rows += fused_ce.bench_shape(shape, dtype, device.type, providers, repeats, interpret)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.set("ce", f"{title}\n\n{fused_ce.table(rows)}", rows)
    text = f"{title}\n\n{fused_ce.table(rows)}" + "".join(f"\n\nShape {s}" for s in skipped)
    report.set("ce", text, rows)


# ---- the report ----------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="only the 30-second smoke check")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on CPU (Triton in the interpreter): tests the script only")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all), e.g. to "
                             f"rerun what a first run did not reach")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="seconds the sections may take in all; a row that would not fit is "
                             "skipped with the reason (default 480)")
    parser.add_argument("--out-dir", type=Path,
                        help="write report.md, results.json and memory_profile.json here")
    parser.add_argument("--repeats", type=int, default=5, help="fused CE: timing repeats")
    parser.add_argument("--steps", type=int, default=5, help="training: timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="training: untimed first steps")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: 989 on H100/H200)")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose among {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # before megatrain's Triton kernels are first imported (the fused-CE rows import them)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 1
    if args.smoke:
        print(smoke(device), flush=True)
        return 0
    import gpu_check_decode
    import gpu_check_memory
    import gpu_check_train

    name = machine_name()
    peak_tf = gpu_check_train.peak_tflops(name, args.peak_tflops)
    title = ("CPU smoke of benchmarks/gpu_check.py (not a benchmark)" if args.cpu_smoke else
             f"GPU check (benchmarks/gpu_check.sh), {name}, {datetime.date.today().isoformat()}")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = Report(args.out_dir, title, f"Command: `python benchmarks/gpu_check.py {command}`; torch "
                                         f"{torch.__version__}, triton {_triton_version()};")
    budget = Budget(args.budget_s)
    wanted = args.sections.split(",")
    small = args.cpu_smoke
    train = gpu_check_train.TrainSection(report, device, small, peak_tf, args.warmup, args.steps)
    # the compiled training rows (minutes of compilation) last, so the budget reaches every section
    order = [("ce", lambda: ce_section(report, budget, device, small, args.repeats)),
             ("train", lambda: train.run(budget, compiled=False)),
             ("memory", lambda: gpu_check_memory.run(report, budget, device, small, args.out_dir)),
             ("decode", lambda: gpu_check_decode.run(report, budget, device, small)),
             ("train", lambda: train.run(budget, compiled=True))]
    for section, run in order:
        if section in wanted:
            print(f"[{section}] {budget.left():.0f} s of the budget left", flush=True)
            with report.guarded(section):
                run()
    report.finish()
    text = report.markdown()
    print(text, flush=True)
    if device.type == "cuda" and not args.no_append:
        with (REPO / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n" + text)
        print("appended to docs/benchmarks.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

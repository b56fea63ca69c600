"""Self-speculative decoding of named training arms: plain vs the adaptive policy vs every draft,
each arm on held-out prompts of its own dataset, with transformers' generate on the arm's HF export
as the ecosystem row.

Arm sets (``--set-of``):
- ``kinds`` (issue 21): the two kinds of MTP on the same 4-layer trunk and budget: ``n1`` (5 layers:
  the trunk + a head layer), ``parallel_n4`` (the trunk + 4 parallel heads), ``sequential_d3`` (the
  trunk + a layer = the main model's 5, + 3 sequential modules). Also the training step's time and
  peak live bytes (``megatrain profile memory``'s exact CPU count) of each.
- ``bytes`` (issue 22, the paper's section 3.3 setting, small): ``byte_n8`` (bytes, n_future 8) and
  ``token_n4`` (the embedded BPE corpus, n_future 4) trained for the same wall-clock budget.

Every decoder's output is compared token for token with plain greedy, every repetition. Bytes per
forward = UTF-8 bytes of the decoded new text / decoding forwards of a row. Times: medians of
``--repeats`` after a warm-up, decoders interleaved. CPU timings are relative only.

    python benchmarks/speculative_arms.py --set-of kinds --work-dir /tmp/arms_kinds
    python benchmarks/speculative_arms.py --set-of bytes --minutes 10 --work-dir /tmp/arms_bytes
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from machine import machine_name  # benchmarks/machine.py
from speculative import held_out_prompts  # benchmarks/speculative.py
from tables import code_span, command_line, print_and_append  # benchmarks/tables.py

REPO = Path(__file__).resolve().parent.parent
QUIET = ["checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false", "train.threads=2"]
KINDS = {"n1": ["model.n_layers=5", "model.n_future=1"],
         "parallel_n4": ["model.n_layers=8", "model.n_future=4", "loss.extra_heads_weight=1"],
         "sequential_d3": ["model.n_layers=5", "model.n_future=4", "model.mtp_kind=sequential"]}
DECODERS = ("plain", "adaptive", "always")


def byte_dataset(work: Path) -> Path:
    """The embedded corpus's files (this interpreter's stdlib without its test suites, the same
    train/val split) tokenized as bytes; built once into ``work``."""
    from megatrain.data_pipelines.prepare import DEFAULT_EXCLUDE_DIRS, STDLIB_TEST_DIRS, prepare_dataset

    out = work / "stdlib_bytes"
    if not (out / "manifest.json").is_file():
        prepare_dataset(Path(sysconfig.get_paths()["stdlib"]), out, tokenizer="bytes", tasks=2,
                        exclude_dirs=DEFAULT_EXCLUDE_DIRS + STDLIB_TEST_DIRS, progress=False)
    return out


def arms(args) -> dict[str, list[str]]:
    if args.set_of == "kinds":
        return {name: [*o, f"train.steps={args.steps}"] for name, o in KINDS.items()}
    data = byte_dataset(Path(args.work_dir))
    # the paper's sum of the heads' losses (the embedded default down-weights heads 2..n)
    shapes = {"byte_n8": [f"data.path={data}", "model.n_future=8", f"model.n_layers={args.byte_layers}",
                          f"data.seq_len={args.byte_seq_len}", "loss.extra_heads_weight=1"],
              "token_n4": ["model.n_future=4", f"model.n_layers={args.token_layers}",
                           "loss.extra_heads_weight=1"]}
    work = Path(args.work_dir)
    return {name: [*o, f"train.steps={budget_steps(name, o, work, args.minutes * 60)}"]
            for name, o in shapes.items()}


def budget_steps(name: str, overrides: list[str], work: Path, seconds: float) -> int:
    """The steps that fill ``seconds`` of training: a cosine schedule needs its length up front, so
    a short calibration run (its first step, which builds caches, left out) measures the step time."""
    import json

    calib = work / f"calibrate_{name}"
    cmd = [sys.executable, "-m", "megatrain", "train", f"run.dir={calib}", *QUIET, *overrides,
           "train.steps=6", "train.eval_every=0", "run.overwrite=archive", "checkpoint.resume=false"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    lines = (calib / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if '"tokens_per_s"' in x]
    seconds_per_step = statistics.median((r["tokens_seen"] - prev["tokens_seen"]) / r["tokens_per_s"]
                                         for prev, r in zip(records, records[1:]))
    return max(1, int(seconds / (seconds_per_step * 1.08)))  # ~8%: evaluations and checkpoints


def train(name: str, overrides: list[str], work: Path) -> Path:
    run_dir = work / name
    cmd = [sys.executable, "-m", "megatrain", "train", f"run.dir={run_dir}", *QUIET, *overrides]
    started = time.perf_counter()
    with open(work / f"train_{name}.log", "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        tail = (work / f"train_{name}.log").read_text()[-3000:]
        sys.exit(f"training {name} failed: {shlex.join(cmd)}\n{tail}")
    print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def _decode(generator, prompts, new, decoder):
    kw = {} if decoder == "plain" else {"speculative": True, "draft_policy": decoder}
    started = time.perf_counter()
    outs = [generator.generate([p], new, **kw) for p in prompts]  # batch 1: the latency case
    return time.perf_counter() - started, outs


def measure(model, prompts, new: int, repeats: int, decode_text) -> dict:
    from megatrain.inference.generate import Generator

    generator = Generator(model)
    for decoder in DECODERS:  # warm-up (and the adaptive policy's first cost measurements)
        _decode(generator, prompts[:2], new, decoder)
    times = {d: [] for d in DECODERS}
    same, outs = True, {}
    for rep in range(repeats):
        order = DECODERS if rep % 2 == 0 else DECODERS[::-1]
        for decoder in order:
            seconds, outs[decoder] = _decode(generator, prompts, new, decoder)
            times[decoder].append(seconds)
        same &= all([o.tokens for o in outs[d]] == [o.tokens for o in outs["plain"]] for d in DECODERS)
    result = {"same": same, "plain_tokens": [o.tokens[0] for o in outs["plain"]]}
    for decoder in DECODERS:
        forwards = sum(o.steps for o in outs[decoder])
        new_bytes = sum(len(decode_text(o.tokens[0]).encode()) for o in outs[decoder])
        result[decoder] = {"s": statistics.median(times[decoder]),
                           "tokens_per_forward": sum(o.n_new for o in outs[decoder]) / forwards,
                           "bytes_per_forward": new_bytes / forwards}
    return result


def hf_row(run_dir: Path, work: Path, prompts, new: int, repeats: int) -> dict | None:
    """transformers' greedy generate on the arm's HF export (sequential: also use_mtp=True)."""
    from megatrain.errors import UserError
    from megatrain.inference.export import export_run

    out = work / f"{run_dir.name}_hf"
    if not out.exists():
        try:
            export_run(run_dir, "hf", out)
        except UserError as err:
            print(f"  no HF row for {run_dir.name}: {err}", flush=True)
            return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    modes = {"transformers generate": {}}
    if getattr(hf.config, "num_mtp_layers", 0):
        modes["transformers generate(use_mtp=True)"] = {"use_mtp": True}
    rows = {}
    for name, kw in modes.items():
        def run(kw=kw):
            started, tokens = time.perf_counter(), []
            for p in prompts:
                ids = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, **kw)
                tokens.append(ids[0, len(p):].tolist())
            return time.perf_counter() - started, tokens
        run()  # warm-up
        timed = [run() for _ in range(repeats)]
        rows[name] = {"s": statistics.median(t for t, _ in timed), "tokens": timed[0][1]}
    return rows


def step_costs(name: str, overrides: list[str], work: Path) -> dict:
    """Training step time (median of 3 after one) and the exact peak live bytes of one profiled step."""
    import json

    out = work / f"profile_{name}"
    cmd = [sys.executable, "-m", "megatrain", "profile", "memory", "--out", str(out), "--steps", "1",
           *overrides, "train.device=cpu", "logging.tensorboard=false"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    peak = json.loads((out / "memory_profile.json").read_text())["ranks"][0]["peak_bytes"]
    timing = work / f"timing_{name}"
    subprocess.run([sys.executable, "-m", "megatrain", "train", f"run.dir={timing}", *QUIET, *overrides,
                    "train.steps=4", "train.eval_every=0", "run.overwrite=archive",
                    "checkpoint.resume=false"],
                   check=True, cwd=REPO, capture_output=True)
    records = [json.loads(x) for x in (timing / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in records[1:])
    return {"peak_bytes": peak, "tokens_per_s": tokens_per_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set-of", choices=("kinds", "bytes"), required=True)
    parser.add_argument("--work-dir", required=True, help="run directories and exports (reused when present)")
    parser.add_argument("--steps", type=int, default=250, help="kinds: training steps of each arm")
    parser.add_argument("--minutes", type=float, default=10.0, help="bytes: training minutes of each arm")
    parser.add_argument("--byte-layers", type=int, default=16,
                        help="bytes: byte_n8's n_layers (8 of them are heads)")
    parser.add_argument("--byte-seq-len", type=int, default=256, help="bytes: byte_n8's data.seq_len")
    parser.add_argument("--token-layers", type=int, default=12,
                        help="bytes: token_n4's n_layers (4 of them are heads)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    parser.add_argument("--out-md", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    from megatrain.inference.export import dataset_tokenizer
    from megatrain.inference.load import load_model
    from megatrain.model.mtp import count_parameters
    from megatrain.spec import dataset_dir_of

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    lines, step_lines = [], []
    for name, overrides in arms(args).items():
        run_dir = work / name
        if not (run_dir / "checkpoints").is_dir():
            train(name, overrides, work)
        model, cfg = load_model(run_dir, max_seq_len=args.prompt_len + args.new + 16)
        tokenizer_path, _ = dataset_tokenizer(cfg)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        prompts = held_out_prompts(dataset_dir_of(cfg), args.prompts, args.prompt_len)
        r = measure(model, prompts, args.new, args.repeats, tokenizer.decode)
        plain = r["plain"]["s"]
        for decoder in DECODERS:
            d = r[decoder]
            lines.append(f"| {name} | {count_parameters(model) / 1e6:.2f}M | {decoder} | "
                         f"{d['tokens_per_forward']:.2f} | {d['bytes_per_forward']:.2f} | {d['s']:.3f} | "
                         f"{plain / d['s']:.2f} | {'yes' if r['same'] else '**no**'} |")
        hf = hf_row(run_dir, work, prompts, args.new, args.repeats)
        for mode, row in (hf or {}).items():
            lines.append(f"| {name} | | {mode} | | | {row['s']:.3f} | {plain / row['s']:.2f} | "
                         f"{'yes' if row['tokens'] == r['plain_tokens'] else '**no**'} |")
        if args.set_of == "kinds":
            costs = step_costs(name, overrides, work)
            step_lines.append(f"| {name} | {count_parameters(model) / 1e6:.2f}M | "
                              f"{costs['tokens_per_s']:.0f} | {costs['peak_bytes'] / 2**20:.2f} |")
        print("\n".join(lines[-5:]), flush=True)
    command = command_line("speculative_arms.py", argv)
    title = ("Parallel heads vs sequential modules" if args.set_of == "kinds"
             else "Byte-level n=8 vs token-level n=4 self-speculative decoding")
    text = [f"### {title} ({datetime.date.today()}, {machine_name()})", "",
            f"Command: {code_span(command)}. Batch 1, greedy, {args.prompts} held-out prompts of up to "
            f"{args.prompt_len} tokens from each arm's val split, {args.new} new tokens, 1 torch thread, "
            f"median of {args.repeats}; speedup = plain time / this decoder's; same = identical tokens to "
            f"plain greedy in every repetition. 1-minute load average {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end. {args.note}", "",
            "| arm | params | decoder | tokens / forward | bytes / forward | seconds | speedup | same |",
            "|---|---|---|---|---|---|---|---|", *lines]
    if step_lines:
        text += ["", "Training step of each arm (the same data; tokens/s = median of steps 2..4, 2 threads; "
                 "peak = the exact live tensor bytes of one profiled step):", "",
                 "| arm | params | train tokens / s | peak live MiB |", "|---|---|---|---|", *step_lines]
    print_and_append("\n".join(text) + "\n", args.out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

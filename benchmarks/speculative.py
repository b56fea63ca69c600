"""Self-speculative decoding vs plain greedy decoding for n_future = 1, 2, 4 models of equal size.

Each model is trained with ``megatrain train`` on the same data (by default the embedded stdlib
corpus), with the same ``model.n_layers`` (so the same parameter count: the heads take their
layers from the trunk) and the same steps; ``--run-dirs A,B,C`` takes existing run directories
instead. Prompts are windows cut from the dataset's val split (held out from training), their
lengths spread over [prompt_len / 2, prompt_len] tokens; every prompt generates
``--max-new-tokens`` tokens (no EOS stop, so every row emits the same number of tokens).

Per model and batch size (1 and 8), both decoders run over the whole prompt set with a KV cache
(``megatrain.inference.generate.Generator``, the same model and prompts): one warm-up call each,
then ``--repeats`` repetitions, plain and speculative alternating (which goes first flips every
repetition, so a drift in the machine's load hits both alike), each timed with
``time.perf_counter`` around its generate calls; the table gives the medians. Every repetition
also checks that the speculative tokens equal the plain greedy tokens, row by row.

Reported: tokens per forward (new tokens / decoding steps of a row, as ``Generation`` counts
them), the fraction of steps whose token from head k was kept (head 1: always), the decoding
forwards of each decoder (a batch runs until its slowest row is done, so at batch 8 they fall
less than tokens per forward suggests), the wall speedup of speculative over plain with its
ratio to tokens per forward (the issue's overhead target: >= 0.9 at batch 1 on GPU; on CPU the
ratio is only reported), and the mean number of distinct tokens among a row's new ones: a weak
model's repetitive output drafts easily, and this column shows when that is what tokens per
forward measures. The n_future=1 model has nothing to draft with, so its two timings are of the
same code: the noise control.

CPU: decoding runs on ``--threads`` torch threads (default 1, stable on shared cores); training
keeps the trainer's ``train.threads``. GPU (``--gpu``): training and decoding on one CUDA device,
the decoder's weights in bf16; without a visible CUDA device the script exits with a message
before anything runs.

    python benchmarks/speculative.py                           # trains 3 models, appends docs
    python benchmarks/speculative.py --quick --out-md ''       # smoke test, prints only
    python benchmarks/speculative.py --run-dirs runs/n1,runs/n2,runs/n4 --prompts 16
    python benchmarks/speculative.py --gpu                     # one CUDA device, bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine import machine_name  # benchmarks/machine.py
from tables import code_span, print_and_append  # benchmarks/tables.py

REPO = Path(__file__).resolve().parent.parent
QUICK = {"steps": 20, "prompts": 8, "max_new_tokens": 16, "prompt_len": 32, "repeats": 2}
FULL = {"steps": 300, "prompts": 16, "max_new_tokens": 48, "prompt_len": 64, "repeats": 5}
QUIET = ["checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false"]


# ---------------------------------------------------------------- models

def train_models(args, device: str) -> list[Path]:
    """Train one model per n_future into ``args.work_dir``; same data, size and steps for each.

    A run directory that already holds this run resumes (and so returns at once when it is done),
    which makes a rerun with the same --work-dir reuse its models."""
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="megatrain-spec-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for n in args.n:
        run_dir = work / f"n{n}"
        overrides = [f"run.dir={run_dir}", f"model.n_future={n}", f"train.steps={args.steps}",
                     f"train.eval_every={args.steps}", f"train.device={device}", *QUIET, *args.set]
        cmd = [sys.executable, "-m", "megatrain", "train", *overrides]
        started = time.perf_counter()
        with open(work / f"train_n{n}.log", "w") as log:
            result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
        if result.returncode != 0:
            tail = (work / f"train_n{n}.log").read_text()[-3000:]
            sys.exit(f"training n_future={n} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")
        print(f"  trained n_future={n} in {time.perf_counter() - started:.0f} s: {run_dir}", flush=True)
        run_dirs.append(run_dir)
    return run_dirs


def head1_val_loss(run_dir: Path) -> float | None:
    """Head 1's validation loss at the run's last evaluation (metrics.jsonl), if it had one."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"val_head_losses"' in line]
    return evals[-1]["val_head_losses"][0] if evals else None


# ---------------------------------------------------------------- prompts

def held_out_prompts(dataset_dir: Path, count: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """``count`` token windows of the val split, evenly spaced through it, each inside one
    document (a window that holds an EOS starts again after it), of lengths drawn uniformly from
    [prompt_len // 2, prompt_len]."""
    from megatrain.data.shards import open_split

    split = open_split(dataset_dir, "val")
    stream = np.concatenate([np.asarray(s.tokens) for s in split.shards]).astype(np.int64)
    lengths = np.random.default_rng(seed).integers(max(prompt_len // 2, 1), prompt_len + 1, count)
    prompts = []
    for start, length in zip(np.linspace(0, len(stream) - prompt_len - 1, count).astype(int), lengths):
        window = stream[start:start + length]
        while (window == split.eos_id).any():
            start += int(np.nonzero(window == split.eos_id)[0][-1]) + 1
            window = stream[start:start + length]
        if len(window) < length:
            break
        prompts.append(window.tolist())
    if len(prompts) < count:
        sys.exit(f"the val split of {dataset_dir} ({len(stream)} tokens) yields only {len(prompts)} "
                 f"prompts of up to {prompt_len} tokens; ask for fewer --prompts or a shorter --prompt-len")
    return prompts


# ---------------------------------------------------------------- timing

@dataclass
class Row:
    run_dir: Path
    n_future: int
    params: int
    val_loss: float | None
    batch: int
    plain_s: float = 0.0
    speculative_s: float = 0.0
    new_tokens: int = 0
    tokens_per_forward: float = 0.0
    kept_per_head: list[float] = field(default_factory=list)
    forwards: tuple[int, int] = (0, 0)  # decoding forwards over all groups: plain, speculative
    rows_differing: int = 0  # rows whose speculative tokens differ from plain greedy, any repetition
    distinct_per_row: float = 0.0  # mean distinct tokens among a row's new ones: low = repetitive output
    sample: list[int] = field(default_factory=list)  # the first prompt's new tokens

    @property
    def speedup(self) -> float:
        return self.plain_s / self.speculative_s


def decode_all(generator, groups, max_new_tokens: int, speculative: bool, sync):
    """Generate every group of prompts; (seconds, generations)."""
    sync()
    started = time.perf_counter()
    outs = [generator.generate(g, max_new_tokens, speculative=speculative) for g in groups]
    sync()
    return time.perf_counter() - started, outs


def measure(generator, row: Row, prompts, max_new_tokens: int, repeats: int, sync) -> Row:
    groups = [prompts[i:i + row.batch] for i in range(0, len(prompts), row.batch)]
    for speculative in (False, True):  # warm-up: allocator, kernels, caches
        generator.generate(groups[0], max_new_tokens, speculative=speculative)
    times = {False: [], True: []}
    differing = set()
    for rep in range(repeats):
        outs = {}
        for speculative in ((False, True) if rep % 2 == 0 else (True, False)):
            seconds, outs[speculative] = decode_all(generator, groups, max_new_tokens, speculative, sync)
            times[speculative].append(seconds)
        plain = [t for g in outs[False] for t in g.tokens]
        spec = [t for g in outs[True] for t in g.tokens]
        differing |= {r for r, (a, b) in enumerate(zip(plain, spec)) if a != b}
    spec_outs = outs[True]  # counts are the same in every repetition: greedy is deterministic
    steps = sum(g.steps for g in spec_outs)
    row.plain_s, row.speculative_s = statistics.median(times[False]), statistics.median(times[True])
    row.new_tokens = sum(g.n_new for g in spec_outs)
    row.forwards = (sum(g.forwards for g in outs[False]), sum(g.forwards for g in spec_outs))
    row.tokens_per_forward = row.new_tokens / steps
    row.kept_per_head = [sum(g.accepted[k] for g in spec_outs) / steps for k in range(row.n_future)]
    row.rows_differing = len(differing)
    rows_tokens = [t for g in spec_outs for t in g.tokens]
    row.distinct_per_row = statistics.mean(len(set(t)) for t in rows_tokens)
    row.sample = rows_tokens[0]
    return row


# ---------------------------------------------------------------- table

def format_table(rows: list[Row], args, context: dict) -> str:
    batches = "/".join(str(b) for b in args.batches)
    n_futures = "/".join(str(r.n_future) for r in rows if r.batch == args.batches[0])
    lines = [f"### Self-speculative vs plain greedy decoding, n_future {n_futures} "
             f"({datetime.date.today()}, {context['machine']})",
             "",
             f"Command: {code_span(f'python benchmarks/speculative.py {shlex.join(sys.argv[1:])}')}; models: "
             f"{context['models']}. Prompts: {args.prompts} windows of the val split of {context['dataset']} "
             f"(held out), {context['prompt_lengths']} tokens, each generating {args.max_new_tokens} tokens "
             f"(no EOS stop). Decoding: `Generator` with KV cache on {context['device']} "
             f"({context['dtype']}{context['threads']}), batch {batches}; time = median of "
             f"{args.repeats} repetitions over all prompts after a warm-up call, plain and speculative "
             f"alternating. Tokens/forward = new tokens / decoding steps per row; kept per head = "
             f"fraction of steps whose token from head k was accepted (head 1 always); forwards = decoding "
             f"forwards after the prefills, all prompts, plain / speculative (a batch runs until its "
             f"slowest row is done); speedup = plain "
             f"time / speculative time; spec == plain compares every row's tokens in every repetition; "
             f"distinct/row = mean number of different tokens among a row's {args.max_new_tokens} new "
             f"ones (low = repetitive output, which drafts easily). n_future=1 has nothing to draft "
             f"with, so its speculative run is plain decoding again: its speedup shows the timing noise. "
             f"{context['note']}",
             "",
             "| n_future | params | head-1 val loss | batch | tokens/forward | kept per head 1..n "
             "| forwards plain / spec | plain (s) | speculative (s) | plain tok/s | spec tok/s "
             "| wall speedup | speedup / tokens per forward | spec == plain | distinct/row |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r.val_loss:.3f}" if r.val_loss is not None else "-"
        same = ("yes" if r.rows_differing == 0 else
                f"**no** ({r.rows_differing} of {args.prompts} rows differ)")
        lines.append(f"| {r.n_future} | {r.params / 1e6:.2f}M | {loss} | {r.batch} | "
                     f"{r.tokens_per_forward:.2f} | {' '.join(f'{k:.2f}' for k in r.kept_per_head)} | "
                     f"{r.forwards[0]} / {r.forwards[1]} | {r.plain_s:.3f} | "
                     f"{r.speculative_s:.3f} | {r.new_tokens / r.plain_s:.0f} | "
                     f"{r.new_tokens / r.speculative_s:.0f} | {r.speedup:.2f} | "
                     f"{r.speedup / r.tokens_per_forward:.2f} | {same} | {r.distinct_per_row:.1f} |")
    return "\n".join(lines)


def describe_models(configs: list, steps: list[int]) -> str:
    from megatrain.config import head_loss_weights

    shapes = {(c.model.n_layers, c.model.dim, c.model.n_heads, c.model.head_type, c.model.vocab_size,
               c.data.seq_len, c.train.batch_size) for c in configs}
    text = "; ".join(f"{L} layers (trunk L-n + n heads), dim {d}, {h} attention heads, {t} heads, "
                     f"vocab {v}, trained on {b}x{s} tokens per step"
                     for L, d, h, t, v, s, b in sorted(shapes))
    # what heads 2..n learned depends on how much their losses weighed (loss.extra_heads_weight)
    weights = " / ".join(" ".join(f"{w:g}" for w in head_loss_weights(c)) for c in configs)
    text += f"; loss weights per head (model by model): {weights}"
    same_steps = len(set(steps)) == 1
    return text + (f", {steps[0]} steps each" if same_steps else f", steps {'/'.join(map(str, steps))}")


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dirs", help="comma-separated run directories to use instead of training")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4], help="n_future values to train")
    parser.add_argument("--steps", type=int, help=f"training steps per model (default {FULL['steps']})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every training run (repeatable), e.g. model.dim=256")
    parser.add_argument("--work-dir", help="where the trained run directories go (default: a new /tmp dir)")
    parser.add_argument("--prompts", type=int, help=f"held-out prompts (default {FULL['prompts']})")
    parser.add_argument("--prompt-len", type=int,
                        help=f"longest prompt in tokens (default {FULL['prompt_len']})")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens per prompt (default {FULL['max_new_tokens']})")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--repeats", type=int, help=f"timed repetitions (default {FULL['repeats']})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--gpu", action="store_true", help="train and decode on one CUDA device, bf16")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for CPU decoding (default 1: on cores other processes "
                             "share, a multi-threaded region stalls whenever one of its cores is taken, "
                             "which swamps the timings; 0 = torch's default). Training keeps the "
                             "trainer's train.threads (--set train.threads=N).")
    parser.add_argument("--note", default="", help="a sentence added to the table's description")
    parser.add_argument("--out-md", default=str(REPO / "docs" / "benchmarks.md"),
                        help="markdown file the table is appended to; '' = print only")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "prompts", "prompt_len", "max_new_tokens", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if min(args.batches) < 1 or max(args.batches) > args.prompts:
        parser.error(f"--batches {args.batches} must lie in [1, --prompts={args.prompts}]")
    return args


def main() -> None:
    args = parse_args()
    import torch

    if args.gpu and not torch.cuda.is_available():
        sys.exit("benchmarks/speculative.py --gpu needs a CUDA device and none is visible "
                 "(torch.cuda.is_available() is False); run it on a GPU machine, or drop --gpu.")
    from tokenizers import Tokenizer

    from megatrain.inference.export import dataset_tokenizer
    from megatrain.inference.generate import Generator
    from megatrain.inference.load import checkpoint_folder, config_of, load_checkpoint
    from megatrain.model.mtp import count_parameters
    from megatrain.spec import dataset_dir_of, trained_length

    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    if not args.gpu and args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    if args.run_dirs:
        run_dirs = [Path(d) for d in args.run_dirs.split(",") if d]
    else:
        print(f"training n_future {' '.join(map(str, args.n))}, {args.steps} steps each", flush=True)
        run_dirs = train_models(args, device)
    folders = [checkpoint_folder(d) for d in run_dirs]
    configs = [config_of(f) for f in folders]
    datasets = {dataset_dir_of(c).resolve() for c in configs}
    if len(datasets) != 1:
        sys.exit(f"the run directories were trained on different datasets ({', '.join(map(str, datasets))}); "
                 f"the comparison needs the same data")
    dataset = datasets.pop()
    prompts = held_out_prompts(dataset, args.prompts, args.prompt_len)
    tokenizer = Tokenizer.from_file(str(dataset_tokenizer(configs[0])[0]))
    need = max(len(p) for p in prompts) + args.max_new_tokens
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)

    rows = []
    for run_dir, folder, cfg in zip(run_dirs, folders, configs):
        trained_len = trained_length(cfg)
        if need > trained_len:
            print(f"note: {need} prompt + new tokens exceed the {trained_len} {run_dir} was trained on",
                  file=sys.stderr)
        model, _ = load_checkpoint(folder, device=device, dtype=dtype,
                                   max_seq_len=max(trained_len, need + cfg.model.n_future))
        generator = Generator(model)
        for batch in args.batches:
            row = Row(run_dir, cfg.model.n_future, count_parameters(model), head1_val_loss(run_dir), batch)
            measure(generator, row, prompts, args.max_new_tokens, args.repeats, sync)
            rows.append(row)
            print(f"  n_future={row.n_future} batch {batch}: {row.tokens_per_forward:.2f} tokens/forward, "
                  f"plain {row.plain_s:.3f} s, speculative {row.speculative_s:.3f} s, speedup "
                  f"{row.speedup:.2f}, spec == plain: {row.rows_differing == 0}", flush=True)
        print(f"  sample: {tokenizer.decode(prompts[0])!r} -> {tokenizer.decode(row.sample)!r}", flush=True)
        del model, generator

    lengths = [len(p) for p in prompts]
    note = (f"CUDA, {torch.cuda.get_device_name()}." if args.gpu else
            f"**CPU timings are relative only**: 1-minute load average {load_at_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.")
    context = {"machine": machine_name(), "device": device, "dtype": str(dtype).replace("torch.", ""),
               "threads": "" if args.gpu else f", torch threads: {torch.get_num_threads()}",
               "dataset": f"`{dataset.name}`", "prompt_lengths": f"{min(lengths)}..{max(lengths)}",
               "models": describe_models(configs, [int(f.name.split("_")[-1]) for f in folders]),
               "note": " ".join(x for x in (note, args.note) if x)}
    table = format_table(rows, args, context)
    print_and_append(table, args.out_md)


if __name__ == "__main__":
    main()

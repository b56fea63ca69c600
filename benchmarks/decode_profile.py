"""Where a decoding forward's time goes, plain vs self-speculative, and what a verify forward costs
beyond its arithmetic.

For one model (a trained run's checkpoint, or random weights of a named shape) and batch 1 and 8,
it decodes the same prompts plainly and self-speculatively (``--policy always``: every draft on
every forward, or ``adaptive``) with timers on the model's parts (forward hooks): each trunk
layer, each head, the unembedding (norm + output), the KV-cache writes and mask (``LayerCache.update``);
"other" is the rest of the wall time (Python, sampling, bookkeeping, host copies). Times are per
decoding forward, in milliseconds, averaged over ``--repeats`` runs after a warm-up.

The overhead bound (issue 22): a verify forward of W tokens per row through the trunk and every
head should cost at most 1.15x the *arithmetic* of that forward, measured as the same model
forward (``Generator._forward`` over the same block, head 1 unembedded at every block position,
heads 2..n at one) timed alone, without the decoding loop around it.

    python benchmarks/decode_profile.py --run-dir runs/default       # the embedded default, trained
    python benchmarks/decode_profile.py --shape trunk-heavy           # random weights, 16 layers, dim 256
    python benchmarks/decode_profile.py --shape default --no-append

Runs against an older megatrain too (its Generator has no draft policy: every draft is verified),
for a before/after: ``PYTHONPATH=<old checkout> python benchmarks/decode_profile.py --shape ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from machine import machine_name  # benchmarks/machine.py
from tables import code_span, command_line, print_and_append  # benchmarks/tables.py

SHAPES = {  # random-weight shapes: (overrides)
    "default": [],  # the embedded default: 6 layers (2 trunk + 4 heads), dim 128
    "trunk-heavy": ["model.n_layers=16", "model.n_future=4", "model.dim=256"],
}
VOCAB = 4096  # the embedded corpus's vocabulary
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


class PartTimer:
    """Forward hooks that add each part's wall time (ms) under its label."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)
        self.handles = []

    def watch(self, module: torch.nn.Module, label: str) -> None:
        starts = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter())))

        def done(m, a, out):
            self.ms[label] += 1e3 * (time.perf_counter() - starts.pop())
        self.handles.append(module.register_forward_hook(done))

    @contextlib.contextmanager
    def cache_writes(self):
        from megatrain.model import kv_cache

        original = kv_cache.LayerCache.update
        timer = self

        def timed(self, k, v):
            started = time.perf_counter()
            try:
                return original(self, k, v)
            finally:
                timer.ms[CACHE] += 1e3 * (time.perf_counter() - started)
        kv_cache.LayerCache.update = timed
        try:
            yield
        finally:
            kv_cache.LayerCache.update = original

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def instrument(model) -> PartTimer:
    timer = PartTimer()
    for key in model.layout.trunk_keys:
        timer.watch(model.layers[key], "trunk layers")
    for i in range(model.n_future):
        timer.watch(model.head_module(i), f"head {i + 1}")
    timer.watch(model.norm, "unembedding (norm + output)")
    timer.watch(model.output, "unembedding (norm + output)")
    return timer


def load(args):
    from megatrain.config import load_config
    from megatrain.inference.load import load_model
    from megatrain.model.mtp import MTPTransformer

    if args.run_dir:
        model, cfg = load_model(args.run_dir, max_seq_len=args.prompt_len + args.new + 16)
        return model, f"the checkpoint of {args.run_dir}"
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", *SHAPES[args.shape]]).model
    model = MTPTransformer(cfg, max_seq_len=args.prompt_len + args.new + 16).eval()
    return model, f"random weights, shape {args.shape} ({' '.join(SHAPES[args.shape]) or 'defaults'})"


CACHE = "kv cache writes + mask (inside the layers)"


def _timed_parts(generator, prompts, new: int, kw) -> tuple[dict[str, float], object]:
    timer = instrument(generator.model)
    with timer.cache_writes():
        out = generator.generate(prompts, new, **kw)
    timer.remove()
    return dict(timer.ms), out


def breakdown(generator, prompts, args, speculative: bool) -> dict:
    """ms per decoding forward by part, and the forwards' count (after a warm-up). The prefill
    (a generation of one token: the prompt's forward alone) is subtracted, part by part."""
    kw = dict(speculative=speculative)
    if "draft_policy" in inspect.signature(generator.generate).parameters:  # older megatrain: always
        kw["draft_policy"] = args.policy
    generator.generate(prompts, args.new, **kw)  # warm-up
    walls, forwards, parts = [], [], defaultdict(list)
    for _ in range(args.repeats):
        prefill_parts, prefill = _timed_parts(generator, prompts, 1, kw)
        decode_parts, out = _timed_parts(generator, prompts, args.new, kw)
        walls.append(1e3 * (out.seconds - prefill.seconds) / out.forwards)
        forwards.append(out.forwards)
        for label, ms in decode_parts.items():
            parts[label].append((ms - prefill_parts.get(label, 0.0)) / out.forwards)
    wall = statistics.median(walls)
    result = {label: statistics.median(v) for label, v in parts.items()}
    outside = sum(v for k, v in result.items() if k != CACHE)  # the cache writes happen inside layers
    result["other (Python, picking tokens, bookkeeping)"] = wall - outside
    return {"wall": wall, "parts": result, "forwards": statistics.median(forwards),
            "tokens_per_forward": out.tokens_per_forward}


def verify_overhead(generator, prompts, args) -> tuple[float, float]:
    """(ms of a speculative decoding forward, ms of the same-width model forward alone)."""
    from megatrain.model.kv_cache import ModelCache

    model, n = generator.model, generator.n
    has_policy = "draft_policy" in inspect.signature(generator.generate).parameters
    always = {"draft_policy": "always"} if has_policy else {}
    out = generator.generate(prompts, args.new, speculative=True, **always)
    prefill = generator.generate(prompts, 1, speculative=True, **always).seconds
    decoding = 1e3 * (out.seconds - prefill) / out.forwards
    batch = len(prompts)
    length = max(len(p) for p in prompts)
    cache = ModelCache.for_model(model, batch, length + args.new + n)
    tokens = torch.tensor([p + [0] * (length - len(p)) for p in prompts])
    block = torch.randint(0, model.cfg.vocab_size, (batch, n))
    times = []
    with torch.no_grad():
        generator._forward(tokens, torch.arange(length).expand(batch, length), cache, True)
        for step in range(args.new // n):
            positions = (length + step * n + torch.arange(n)).expand(batch, n)
            started = time.perf_counter()
            outs = generator._forward(block, positions, cache, True)
            model.logits(outs[0]).float().cpu()  # head 1 at every block position
            last = torch.zeros(batch, dtype=torch.long)
            for o in outs[1:]:  # heads 2..n at one position each
                generator._logits_at(o, last)
            times.append(1e3 * (time.perf_counter() - started))
    return decoding, statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", help="a trained run (its newest checkpoint)")
    source.add_argument("--shape", choices=SHAPES, default="default", help="random weights of this shape")
    parser.add_argument("--policy", choices=("always", "adaptive"), default="always")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="a sentence for the table (machine load, ...)")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from megatrain.inference.generate import Generator

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, what = load(args)
    generator = Generator(model)
    lines, overhead_lines = [], []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(1, model.cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        for speculative in (False, True):
            r = breakdown(generator, prompts, args, speculative)
            label = f"speculative ({args.policy})" if speculative else "plain"
            parts = " / ".join(f"{k} {v:.2f}" for k, v in sorted(r["parts"].items()))
            lines.append(f"| {batch} | {label} | {r['tokens_per_forward']:.2f} | {r['wall']:.2f} | {parts} |")
        decoding, arithmetic = verify_overhead(generator, prompts, args)
        ratio = decoding / arithmetic
        overhead_lines.append(f"| {batch} | {decoding:.2f} | {arithmetic:.2f} | {ratio:.2f} |")
    cfg = model.cfg
    command = command_line("decode_profile.py", argv)
    text = "\n".join([
        f"### Where a decoding forward's time goes ({datetime.date.today()}, {machine_name()})", "",
        f"Command: {code_span(command)}; model: {what}: {cfg.n_layers} layers ({cfg.n_future} heads, "
        f"{cfg.head_type}), dim {cfg.dim}, vocab {cfg.vocab_size}; {args.prompt_len}-token random "
        f"prompts, {args.new} new tokens, {args.threads} torch thread(s), fp32; median of {args.repeats} "
        f"runs after a warm-up; ms per decoding forward (the prefill excluded), parts timed by forward "
        f"hooks. {args.note}", "",
        "| batch | decoder | tokens / forward | ms / forward | parts (ms / forward) |",
        "|---|---|---|---|---|",
        *lines, "",
        "Verify forwards against their arithmetic: ms of a speculative decoding forward (every draft "
        "verified) vs the same-width model forward alone (trunk and every head over the block, head 1 "
        "unembedded at every position, heads 2..n at one); target <= 1.15.", "",
        "| batch | speculative forward (ms) | its arithmetic (ms) | ratio |", "|---|---|---|---|",
        *overhead_lines, ""])
    print_and_append(text, "" if args.no_append else str(DOCS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

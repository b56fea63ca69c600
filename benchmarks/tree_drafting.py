"""Would tree drafting pay? The exact tokens per forward of top-k draft trees, and their price.

Tree drafting (Medusa, EAGLE) verifies several candidate continuations in one forward: the top-k
tokens of each draft head instead of the top-1, with a tree attention mask over the candidates. For
greedy decoding its effect on tokens per forward needs no tree implementation to measure: the
greedy continuation is fixed (speculative output == plain greedy), so a tree of candidates keeps
exactly as many tokens as there are leading depths whose greedy token is among that depth's
candidates. This script decodes held-out prompts plainly, runs one teacher-forced forward of every
head over prompt + continuation, and replays the speculative loop with each tree shape:

- ``chain``: top-1 of every draft head (what megatrain's ``--draft-policy always`` verifies); its
  replayed tokens per forward is checked against a real ``always`` decode of the same prompts;
- ``top-k first``: the k best tokens of head 2, each followed by the top-1 chain of heads 3..n
  (Medusa's sparse trees put their width at depth 1);
- ``top-k all``: every combination of the k best tokens of each draft head (k^1 + ... + k^(n-1)
  candidate tokens).

Parallel heads draft every depth from the same hidden state, so the candidates of depth j do not
depend on which candidate of depth j-1 is on the path. (Sequential modules feed each depth the
token drafted before it: a tree over them needs one module forward per branch, so only their chain
is replayed.) The price: the median time of a cached verify forward whose block holds the root and
every candidate, measured here for each width (W = 1 + candidates), as ``decode_profile.py``
measures the verify arithmetic; predicted speed = tokens per forward / ms per forward.

    python benchmarks/tree_drafting.py --run-dir runs/parallel_n4 --run-dir runs/byte_n8
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine_name  # benchmarks/machine.py
from speculative import held_out_prompts  # benchmarks/speculative.py
from tables import code_span, command_line, print_and_append  # benchmarks/tables.py

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def tree_shapes(n_drafts: int, widths: list[int]) -> dict[str, list[int]]:
    """Name -> candidates per depth (k_1, ..., k_d) of the trees compared."""
    shapes = {"chain": [1] * n_drafts}
    for k in widths:
        shapes[f"top-{k} first"] = [k] + [1] * (n_drafts - 1)
        shapes[f"top-{k} all"] = [k] * n_drafts
    return shapes


def candidates(per_depth: list[int], product: bool) -> int:
    """Candidate tokens in the tree (the root excluded)."""
    if not product:  # top-k first: k paths, each one token per depth
        return per_depth[0] * len(per_depth)
    total, layer = 0, 1
    for k in per_depth:
        layer *= k
        total += layer
    return total


def replay(ranks: torch.Tensor, start: int, per_depth: list[int]) -> tuple[int, int]:
    """(tokens, forwards) of speculative decoding from ``start`` to the end of the sequence.

    ``ranks[t, j]``: the rank of the greedy token at t + 1 + j among head j+1's logits at
    position t (0 = its top-1); head 1's token is always kept, depth j's draft is kept while every
    depth before it was and the greedy token is among its k_j candidates."""
    t, forwards, end = start, 0, ranks.shape[0]
    while t < end:
        forwards += 1
        kept = 1
        for j, k in enumerate(per_depth, start=1):
            if t + j >= end or ranks[t, j] >= k:
                break
            kept += 1
        t += kept
    return end - start, forwards


def greedy_ranks(model, sequence: list[int]) -> torch.Tensor:
    """(T - 1, n) ranks of each next greedy token among each head's logits (teacher-forced)."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence]), return_all_heads=True)[0].float()  # (T, n, V)
    T, n, _ = logits.shape
    ranks = torch.full((T - 1, n), 10**9, dtype=torch.long)
    for j in range(n):
        targets = torch.tensor(sequence[1 + j:], dtype=torch.long)  # head j+1 at t predicts t+1+j
        rows = logits[: len(targets), j]
        ranks[: len(targets), j] = (rows > rows.gather(1, targets[:, None])).sum(1)
    return ranks


def forward_ms(generator, width: int, prompt_len: int, steps: int) -> float:
    """Median ms of a cached forward of a ``width``-token block at batch 1 through the trunk and
    every head, head 1 unembedded at every position, heads 2..n at one."""
    from megatrain.model.kv_cache import ModelCache

    model, n = generator.model, generator.n
    # every timed forward writes the same positions: each sees the same context length
    cache = ModelCache.for_model(model, 1, prompt_len + width + n)
    tokens = torch.randint(1, model.cfg.vocab_size, (1, prompt_len))
    block = torch.randint(1, model.cfg.vocab_size, (1, width))
    times = []
    with torch.no_grad():
        generator._forward(tokens, torch.arange(prompt_len)[None], cache, True)
        positions = (prompt_len + torch.arange(width))[None]
        for _ in range(steps):
            started = time.perf_counter()
            outs = generator._forward(block, positions, cache, True)
            model.logits(outs[0]).float().cpu()
            for o in outs[1:]:
                generator._logits_at(o, torch.zeros(1, dtype=torch.long))
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(run_dir: str, args) -> list[str]:
    from megatrain.inference.generate import Generator
    from megatrain.inference.load import load_model
    from megatrain.spec import dataset_dir_of

    _, cfg = load_model(run_dir)
    sequential = cfg.model.mtp_kind == "sequential"
    n_drafts = cfg.model.n_future - 1
    shapes = tree_shapes(n_drafts, [] if sequential else args.k)
    widest = max(1 + candidates(d, product=not name.endswith("first")) for name, d in shapes.items())
    # room for the widest tree block timed (forward_ms) as well as for the decoded text
    model, cfg = load_model(run_dir, max_seq_len=args.prompt_len + max(args.new, widest) + cfg.model.n_future)
    generator = Generator(model)
    prompts = held_out_prompts(dataset_dir_of(cfg), args.prompts, args.prompt_len)
    totals = {name: [0, 0] for name in shapes}
    real_tokens, real_forwards = 0, 0
    for prompt in prompts:
        plain = generator.generate([prompt], args.new)
        sequence = prompt + plain.tokens[0]
        ranks = greedy_ranks(model, sequence)
        for name, per_depth in shapes.items():
            tokens, forwards = replay(ranks, len(prompt) - 1, per_depth)
            totals[name][0] += tokens
            totals[name][1] += forwards
        real = generator.generate([prompt], args.new, speculative=True, draft_policy="always")
        assert real.tokens == plain.tokens, "speculative greedy differs from plain greedy"
        real_tokens, real_forwards = real_tokens + real.n_new, real_forwards + real.steps
    ms = {}
    lines = []
    chain_speed = None
    for name, per_depth in shapes.items():
        width = 1 + candidates(per_depth, product=not name.endswith("first"))
        if width not in ms:
            ms[width] = forward_ms(generator, width, args.prompt_len, args.steps)
        tokens_per_forward = totals[name][0] / totals[name][1]
        speed = tokens_per_forward / ms[width]
        chain_speed = chain_speed or speed
        lines.append(f"| {Path(run_dir).name} | {name} | {width} | {tokens_per_forward:.2f} | "
                     f"{ms[width]:.2f} | {speed / chain_speed:.2f} |")
    real = real_tokens / real_forwards  # as Generation.tokens_per_forward counts them
    lines.append(f"| {Path(run_dir).name} | (chain, decoded for real) | {n_drafts + 1} | {real:.2f} | | |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", action="append", required=True, help="a trained run (repeatable)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3], help="candidates per depth")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--steps", type=int, default=24, help="timed forwards per block width")
    parser.add_argument("--note", default="")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = [line for run_dir in args.run_dir for line in measure(run_dir, args)]
    command = command_line("tree_drafting.py", argv)
    text = "\n".join([
        f"### Would tree drafting pay? ({datetime.date.today()}, {machine_name()})", "",
        f"Command: {code_span(command)}. Batch 1, greedy, {args.prompts} held-out prompts of up to "
        f"{args.prompt_len} tokens, {args.new} new tokens, 1 torch thread. Tokens per forward: exact, "
        f"replayed from each head's rank of the greedy continuation (teacher-forced), the prefill "
        f"excluded; width: tokens in the verify block (root + candidates); ms: median cached forward "
        f"of that width (trunk and every head, head 1 unembedded at every position); speed: tokens "
        f"per ms relative to the chain's (> 1: the tree would be faster). {args.note}", "",
        "| run | draft tree | block width | tokens / forward | ms / forward | speed vs chain |",
        "|---|---|---|---|---|---|", *lines, ""])
    print_and_append(text, "" if args.no_append else str(DOCS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One HumanEval evaluation: sets of samples (the model's, a completions file's, or the reference
solutions) checked in the sandbox, with their pass@k.

The model's sets are greedy completions (pass@1) and, with ``samples`` > 0, that many samples
per problem at each temperature (pass@k for k in {1, 10, 100} up to ``samples``).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch

from megatrain.eval import humaneval
from megatrain.eval.completion import DecodingStats, complete
from megatrain.eval.humaneval import STOP_SEQUENCES, Problem
from megatrain.eval.sandbox import Sandbox
from megatrain.inference.generate import Sampling
from megatrain.inference.source import ModelSource

SampleSet = tuple[str, dict, dict[str, list[str]]]  # (mode, its settings, completions by task_id)
CONTEXT_MARGIN = 64  # RoPE positions beyond the longest prompt + budget: the heads' drafts


@dataclass
class Decoding:
    samples: int = 0  # per problem and temperature; 0 = greedy only
    temperatures: tuple[float, ...] = (0.2, 0.8)
    top_p: float = 0.95
    seed: int = 0
    max_new_tokens: int = 384
    batch_size: int = 8
    speculative: bool = True  # used when the model has more than one head


def generated_sets(source: ModelSource, problems: list[Problem], decoding: Decoding, *,
                   device: torch.device, dtype: torch.dtype) -> tuple[list[SampleSet], dict]:
    """The model's completions: greedy, then ``decoding.samples`` per temperature; and how
    decoding went (tokens per forward with self-speculative decoding)."""
    tokenizer, eos_id = source.tokenizer()
    longest = max(len(tokenizer.encode(p.prompt, add_special_tokens=False).ids) for p in problems)
    trained = source.trained_length()
    if trained and longest + decoding.max_new_tokens > trained:
        print(f"note: prompts of up to {longest} tokens plus {decoding.max_new_tokens} new ones exceed "
              f"the {trained} the model was trained on; quality may degrade", file=sys.stderr)
    context = longest + decoding.max_new_tokens + CONTEXT_MARGIN
    model, cfg = source.load(device, dtype, max_seq_len=max(context, trained or 0))
    speculative = decoding.speculative and cfg.model.n_future > 1
    stats = DecodingStats()
    prompts = [p.prompt for p in problems]
    common = dict(max_new_tokens=decoding.max_new_tokens, stop=STOP_SEQUENCES, speculative=speculative,
                  batch_size=decoding.batch_size, stats=stats)
    print(f"humaneval: greedy completions of {len(problems)} problems", file=sys.stderr, flush=True)
    greedy = complete(model, tokenizer, eos_id, prompts, sampling=Sampling(), **common)
    sets = [("greedy", {"temperature": 0.0}, {p.task_id: [c] for p, c in zip(problems, greedy)})]
    n = decoding.samples
    for temperature in decoding.temperatures if n else ():
        print(f"humaneval: {n} samples per problem at temperature {temperature}", file=sys.stderr, flush=True)
        texts = complete(model, tokenizer, eos_id, [p for p in prompts for _ in range(n)],
                         sampling=Sampling(temperature, decoding.top_p, decoding.seed), **common)
        sets.append((f"t{temperature:g}", {"temperature": temperature, "top_p": decoding.top_p},
                     {p.task_id: texts[i * n:(i + 1) * n] for i, p in enumerate(problems)}))
    return sets, {"speculative": speculative, "n_future": cfg.model.n_future,
                  "max_new_tokens": decoding.max_new_tokens, "new_tokens": stats.new_tokens,
                  "tokens_per_forward": stats.tokens_per_forward, "seconds": stats.seconds}


def evaluate_sets(sandbox: Sandbox, problems: list[Problem], sets: list[SampleSet], workers: int) -> dict:
    """pass@k of each set, a table row per set, and a record per sample (``records``)."""
    modes, records, table = {}, [], []
    for mode, settings, completions in sets:
        scores, mode_records = humaneval.score(sandbox, problems, completions, workers)
        modes[mode] = {**settings, **scores}
        records += [{"mode": mode, **r} for r in mode_records]
        table.append({"mode": mode, **{k: v for k, v in settings.items() if k != "file"},
                      "problems": scores["problems"], "samples": scores["samples"],
                      **{k: v for k, v in scores.items() if k.startswith("pass@")}})
    best = best_temperature_per_k(modes)
    if best:
        modes["best temperature per k"] = best
        table.append({"mode": "best temperature per k", **{k: v["value"] for k, v in best.items()}})
    return {"problems": len(problems), "stop_sequences": list(STOP_SEQUENCES),
            "limits": dataclasses.asdict(sandbox.limits), "modes": modes, "table": table, "records": records}


def best_temperature_per_k(modes: dict) -> dict:
    """pass@k as the Codex paper and the MTP paper report it: for each k, the best of the sampled
    temperatures (with the default 0.2 and 0.8, usually pass@1 at 0.2 and pass@10/100 at 0.8).
    Empty with fewer than two sampled temperatures, where the per-temperature rows say it all."""
    sampled = {mode: scores for mode, scores in modes.items() if scores.get("temperature", 0) > 0}
    if len(sampled) < 2:
        return {}
    ks = sorted({k for scores in sampled.values() for k in scores if k.startswith("pass@")},
                key=lambda k: int(k[5:]))
    best = {}
    for k in ks:
        mode = max((m for m in sampled if k in sampled[m]), key=lambda m: sampled[m][k])
        best[k] = {"value": sampled[mode][k], "temperature": sampled[mode]["temperature"]}
    return best

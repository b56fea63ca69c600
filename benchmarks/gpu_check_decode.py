"""GPU check, section 4: what a decoding forward costs, plain and self-speculative.

A model of the 1.3B n_future=4 paper shape with random weights (bf16, KV cache), random prompts of
``PROMPT`` tokens, greedy, batch 1 and 8. Random weights accept almost no drafts, so this measures
the *cost per forward*: plain decoding runs one token per row through the trunk and head 1;
speculative decoding verifies a block of n_future tokens through the trunk and every head. The
cost of the forwards alone is the difference between generating ``NEW`` tokens and generating one
(the prefill and its first token), over the decoding forwards. A trained model's speculative
decoding beats plain decoding when its tokens per forward exceed the ratio of the two costs:
the "break-even" column. The paper's code models reach 3.5 tokens per forward at n=4 (§3.2).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

PROMPT, NEW, REPEATS = 128, 64, 3
SECTION_SECONDS = 60  # rough, on an H100: model build and 2 batch sizes x 2 decoders x repeats


def build_model(smoke: bool, device: torch.device):
    from megatrain.config import load_config
    from megatrain.model.mtp import MTPTransformer

    if smoke:
        cfg = load_config(None, ["model.vocab_size=512"]).model
    else:
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs/paper/1.3b_n4.yaml").model
    with torch.device(device):
        model = MTPTransformer(cfg, max_seq_len=PROMPT + NEW + cfg.n_future + 1)
    return model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()


def _timed(generator, prompts, new: int, speculative: bool, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generator.generate(prompts, new, speculative=speculative)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def forward_cost(generator, prompts, speculative: bool, device: torch.device) -> dict:
    """Median seconds per decoding forward (prefill excluded) and the tokens per forward."""
    _timed(generator, prompts, NEW, speculative, device)  # warm-up: kernels, cache allocations
    per_forward, tokens_per_forward = [], []
    for _ in range(REPEATS):
        whole, out = _timed(generator, prompts, NEW, speculative, device)
        prefill, _ = _timed(generator, prompts, 1, speculative, device)
        per_forward.append((whole - prefill) / max(out.forwards, 1))
        tokens_per_forward.append(out.tokens_per_forward)
    return {"ms_per_forward": 1e3 * statistics.median(per_forward),
            "tokens_per_forward": statistics.median(tokens_per_forward), "forwards": out.forwards}


def run(report, budget, device: torch.device, smoke: bool) -> None:
    """Section 4 into ``report`` under the key "decode"."""
    from megatrain.inference.generate import Generator

    shape = "the tiny default (CPU smoke)" if smoke else "1.3B n_future=4 shape"
    dtype = "bf16" if device.type == "cuda" else "fp32"
    title = (f"**4. Decoding cost per forward**, {shape}, random weights ({dtype}), KV cache, greedy, "
             f"{PROMPT}-token random prompts, {NEW} new tokens; ms per decoding forward = (time for {NEW} "
             f"tokens - time for 1) / forwards, median of {REPEATS}. Break-even = speculative / plain ms "
             f"per forward: the tokens per forward a trained model needs for speculative decoding to pay.")
    need = 10 if smoke else SECTION_SECONDS
    if not budget.allows(need):
        report.set("decode", f"{title} {budget.skip_reason(need)}")
        return
    model = build_model(smoke, device)
    generator = Generator(model)
    vocab = model.cfg.vocab_size
    lines = ["| batch | plain ms / forward | speculative ms / forward | tokens / forward (random weights) | "
             "break-even tokens / forward |", "|---:|---:|---:|---:|---:|"]
    rows = []
    try:
        for batch in (1, 8):
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(1, vocab, (batch, PROMPT), generator=gen).tolist()
            plain = forward_cost(generator, prompts, False, device)
            spec = forward_cost(generator, prompts, True, device)
            even = spec["ms_per_forward"] / plain["ms_per_forward"]
            lines.append(f"| {batch} | {plain['ms_per_forward']:.2f} | {spec['ms_per_forward']:.2f} | "
                         f"{spec['tokens_per_forward']:.2f} | {even:.2f} |")
            rows.append({"batch": batch, "plain": plain, "speculative": spec, "break_even": even})
            report.set("decode", f"{title}\n\n" + "\n".join(lines), rows)
    finally:
        del generator, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

"""Code completions from a model: prompts in, completions cut at the first stop sequence out.

Decoding is megatrain's own Generator (plain or self-speculative, greedy or sampled). It knows only
EOS and a token budget, so completion runs in rounds of ``chunk`` tokens: after each round the rows
whose text reached a stop sequence (or EOS, or the budget) are done, and the others continue from
their prompt plus what they have so far. Most HumanEval completions end well before the budget,
so this saves most of the decoding a fixed budget would spend.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from megatrain.inference.generate import Generator, Sampling
from megatrain.model.mtp import MTPTransformer


@dataclass
class DecodingStats:
    new_tokens: int = 0
    row_steps: int = 0  # decoding forwards x rows still generating (Generation.steps)
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.row_steps, 1)


def truncate(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def complete(model: MTPTransformer, tokenizer, eos_id: int | None, prompts: list[str], *,
             max_new_tokens: int, stop: tuple[str, ...], sampling: Sampling, speculative: bool,
             batch_size: int, chunk: int = 64, stats: DecodingStats | None = None) -> list[str]:
    """One completion per prompt (prompts may repeat: N samples of one problem), truncated."""
    generator = Generator(model)
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    completions: list[str] = []
    for first in range(0, len(prompts), batch_size):
        rows = encoded[first:first + batch_size]
        completions += _complete_batch(generator, tokenizer, eos_id, rows, max_new_tokens, stop, sampling,
                                       speculative, chunk, first, stats)
    return completions


def _complete_batch(generator, tokenizer, eos_id, prompts, max_new_tokens, stop, sampling, speculative,
                    chunk, batch_seed, stats) -> list[str]:
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for round_index in range(-(-max_new_tokens // chunk)):
        if not active:
            break
        budget = min(chunk, max_new_tokens - round_index * chunk)
        # a seed of its own per batch and round, derived from the user's: reproducible, and no two
        # rounds repeat each other's draws
        seed = _seed(sampling.seed, batch_seed, round_index)
        result = generator.generate([prompts[r] + new[r] for r in active], budget, speculative=speculative,
                                    sampling=Sampling(sampling.temperature, sampling.top_p, seed),
                                    eos_id=eos_id)
        if stats is not None:
            stats.new_tokens += result.n_new
            stats.row_steps += result.steps
            stats.seconds += result.seconds
        still = []
        for r, tokens in zip(active, result.tokens):
            new[r] += tokens
            ended = eos_id in tokens or len(new[r]) >= max_new_tokens
            if not ended and not any(s in _decode(tokenizer, new[r], eos_id) for s in stop):
                still.append(r)
        active = still
    return [truncate(_decode(tokenizer, tokens, eos_id), stop) for tokens in new]


def _decode(tokenizer, tokens: list[int], eos_id: int | None) -> str:
    if eos_id in tokens:
        tokens = tokens[:tokens.index(eos_id)]
    return tokenizer.decode(tokens)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1

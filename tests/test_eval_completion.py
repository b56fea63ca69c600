"""Completions in rounds (megatrain/eval/completion.py) are one greedy decode cut at a stop.

What is protected: decoding in rounds of a few tokens, each restarting from prompt + text so far,
gives the same greedy text as one uninterrupted decode truncated at the first stop sequence, plain
and self-speculative, for rows of a batch that stop at different times; a row stops generating
once its text holds a stop sequence. Negative control: the comparison tells two prompts apart.
"""

import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.eval.completion import DecodingStats, complete, truncate
from megatrain.inference.generate import Generator, Sampling
from megatrain.model.mtp import MTPTransformer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,:()"  # one character per token id
STOP = ("q", "z")


class _Letters:
    """A tokenizer with the ``tokenizers`` calls completion.py makes: one character per id."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Encoding([ALPHABET.index(c) for c in text])

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(n_layers=4, n_future=3, dim=32, n_heads=4, n_kv_heads=2, vocab_size=len(ALPHABET),
                      multiple_of=16)
    model = MTPTransformer(cfg, max_seq_len=128, seed=7).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # weights far from the init, so that greedy text varies
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model


PROMPTS = ["def f(a, b):", "return x", "lambda y:"]


def _one_decode(model, prompt: str, max_new: int) -> str:
    ids = _Letters().encode(prompt).ids
    tokens = Generator(model).generate([ids], max_new).tokens[0]
    return truncate(_Letters().decode(tokens), STOP)


@pytest.mark.parametrize("speculative", [False, True])
def test_rounds_give_the_single_greedy_decode_cut_at_the_stop(model, speculative):
    stats = DecodingStats()
    got = complete(model, _Letters(), None, PROMPTS, max_new_tokens=40, stop=STOP, sampling=Sampling(),
                   speculative=speculative, batch_size=2, chunk=3, stats=stats)
    expected = [_one_decode(model, p, 40) for p in PROMPTS]
    assert got == expected
    assert any(len(text) < 40 for text in got), got  # some rows did stop early...
    assert stats.new_tokens < 40 * len(PROMPTS)  # ...and stopped generating there


def test_comparison_tells_prompts_apart(model):
    """Negative control: the first prompt's completion is not the second one's decode."""
    got = complete(model, _Letters(), None, PROMPTS[:1], max_new_tokens=40, stop=STOP, sampling=Sampling(),
                   speculative=False, batch_size=1, chunk=3)
    assert got == [_one_decode(model, PROMPTS[0], 40)]
    assert got != [_one_decode(model, PROMPTS[1], 40)]

"""Generation with a KV cache, plain or self-speculative (blockwise parallel decoding).

Plain decoding runs the trunk and head 1 one token at a time. Self-speculative decoding (Stern et
al. 2018, as in Gloeckle et al. 2024 §3.2) uses the extra heads as the draft model: after head 1
gives the next token t0, heads 2..n propose the n-1 tokens after it. One forward of the trunk and
the heads over the block [t0, d1 .. d_{n-1}] then verifies the drafts: d_k is accepted while it is
what head 1 predicts after the tokens before it, i.e. exactly the token plain decoding would have
produced. Of the block, t0 and the accepted drafts are kept, head 1's prediction after the last
accepted token is the next t0, and heads 2..n at that position draft again. Rows of a batch
accept different numbers of drafts: each row keeps its own length in the cache (kv_cache.py), and
what a row rejected is forgotten by rolling its length back.

With sampling the acceptance rule is speculative sampling's (Leviathan et al. 2023; Chen et al.
2023): a draft d sampled from a head's distribution q is kept with probability min(1, p(d)/q(d))
under head 1's distribution p, and a rejection is replaced by a sample of max(0, p - q)
(normalised), so every emitted token is distributed exactly as head 1's. Greedy decoding is the
zero-temperature case of the same loop, and its output equals plain greedy decoding token for
token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatrain.model.kv_cache import ModelCache
from megatrain.model.mtp import MTPTransformer


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from: softmax(logits / T), cut to the top-p nucleus."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each row, up to and including EOS
    forwards: int  # decoding forwards after the prompt's prefill
    accepted: list[int] = field(default_factory=list)  # per head: steps its token was kept
    steps: int = 0  # row-steps of decoding (forwards x rows still generating)
    seconds: float = 0.0

    @property
    def n_new(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        return self.n_new / max(self.steps, 1)

    @property
    def accepted_per_head(self) -> list[float]:
        """Per head, the fraction of row-steps whose token from it was kept (head 1: always)."""
        return [a / max(self.steps, 1) for a in self.accepted]


class Generator:
    """Greedy or sampled generation from an MTPTransformer, plain or self-speculative."""

    def __init__(self, model: MTPTransformer):
        self.model = model.eval()
        self.n = model.n_future
        self.capacity = model.rope_cos.shape[0]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling | None = None,
                 speculative: bool = False, eos_id: int | None = None) -> Generation:
        sampling = sampling or Sampling()
        if speculative and self.n == 1:
            speculative = False  # nothing to draft with: plain decoding is the same thing
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        need = max(len(p) for p in prompts) + max_new_tokens + self.n
        if need > self.capacity:
            raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens plus {max_new_tokens} "
                             f"new ones needs {need} positions, the model has {self.capacity} "
                             f"(its max_seq_len); generate fewer tokens or load it with a larger one")
        started = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        state = _Rows(prompts, max_new_tokens, eos_id, self.n)
        cache = ModelCache.for_model(self.model, len(prompts), need)
        logits = self._prefill(prompts, cache, all_heads=speculative)
        if speculative:
            self._speculative(state, cache, logits, sampling, generator)
        else:
            self._plain(state, cache, logits[0], sampling, generator)
        return Generation(state.output(), state.forwards, state.accepted, state.steps,
                          time.perf_counter() - started)

    # ---- forwards ------------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: ModelCache,
                 all_heads: bool) -> list[torch.Tensor]:
        """Pre-norm outputs (B, T, D) of head 1, or of every head, for tokens at ``positions``.

        Hidden states, not logits: every position must pass through each head layer (its KV cache
        needs it), but the unembedding, at small widths the costliest part, is applied only
        where a token is read off (``_logits_at``)."""
        cache.at(positions)
        hidden = self.model.trunk(tokens, cache)
        if all_heads or self.model.head_type == "anticausal":  # anticausal: head 1 reads head 2
            outs = self.model.head_outputs(hidden, cache)
            return outs if all_heads else outs[:1]
        return [self.model.head_forward(0, hidden, cache)]

    def _logits_at(self, head_out: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one head at block position ``at`` (B,) of each row, as float32 on the CPU."""
        rows = torch.arange(head_out.shape[0], device=head_out.device)
        return self.model.logits(head_out[rows, at.to(head_out.device)]).float().cpu()

    def _prefill(self, prompts, cache, all_heads: bool) -> list[torch.Tensor]:
        """Run the prompts (right-padded) in one forward; logits at each row's last prompt token."""
        device = self.model.rope_cos.device
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = torch.tensor(p, device=device)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        outs = self._forward(tokens, positions, cache, all_heads)
        last = torch.tensor([len(p) - 1 for p in prompts])
        return [self._logits_at(out, last) for out in outs]  # each (B, V)

    # ---- plain decoding --------------------------------------------------------------------------
    def _plain(self, state, cache, logits, sampling, generator) -> None:
        nxt = _pick(logits, sampling, generator)
        while state.active():
            state.emit([[int(t)] for t in nxt.tolist()], accepted_drafts=[0] * state.batch)
            if not state.active():
                break
            positions = state.lengths[:, None] - 1  # the token just emitted is not in the cache yet
            device = self.model.rope_cos.device
            out = self._forward(nxt[:, None].to(device), positions.to(device), cache, False)[0]
            logits = self._logits_at(out, torch.zeros(state.batch, dtype=torch.long))
            state.forwards += 1
            nxt = _pick(logits, sampling, generator)

    # ---- self-speculative decoding ---------------------------------------------------------------
    def _speculative(self, state, cache, logits, sampling, generator) -> None:
        n, batch = self.n, state.batch
        rows = torch.arange(batch)
        t0 = _pick(logits[0], sampling, generator)
        drafts, draft_probs = self._draft(logits[1:], sampling, generator)
        while state.active():
            if state.last_token_of_every_row():  # t0 is head 1's own: no verify forward needed
                state.emit([[int(t)] for t in t0.tolist()], accepted_drafts=[0] * batch)
                break
            block = torch.cat([t0[:, None], drafts], dim=1)  # (B, n): t0, d1 .. d_{n-1}
            positions = state.lengths[:, None] + torch.arange(n)  # t0 sits at the row's length
            outs = self._forward(block.to(self.model.rope_cos.device),
                                 positions.to(self.model.rope_cos.device), cache, True)
            state.forwards += 1
            p = self.model.logits(outs[0]).float().cpu()  # (B, n, V): head 1 after each block token
            if sampling.greedy:
                predicted = p.argmax(-1)  # (B, n)
                kept = (drafts == predicted[:, :-1]).long().cumprod(dim=1)  # (B, n-1)
                n_kept = kept.sum(1)
                t0_next = predicted[rows, n_kept]
            else:
                n_kept, t0_next = _speculative_sampling(p, drafts, draft_probs, sampling, generator)
            emitted = [[int(t0[r])] + drafts[r, :int(n_kept[r])].tolist() for r in range(batch)]
            state.emit(emitted, accepted_drafts=n_kept.tolist())
            # heads 2..n draft after the last kept token: only there are they unembedded
            drafts, draft_probs = self._draft([self._logits_at(out, n_kept) for out in outs[1:]],
                                              sampling, generator)
            t0 = t0_next

    def _draft(self, picked: list[torch.Tensor], sampling, generator):
        """Heads 2..n's tokens from their logits (B, V) each: (B, n-1), and the distributions
        they were drawn from (sampling only)."""
        if sampling.greedy:
            return torch.stack([lg.argmax(-1) for lg in picked], dim=1), None
        probs = [sampling.probs(lg) for lg in picked]
        tokens = torch.stack([torch.multinomial(q, 1, generator=generator)[:, 0] for q in probs], dim=1)
        return tokens, torch.stack(probs, dim=1)  # (B, n-1), (B, n-1, V)


def _pick(logits: torch.Tensor, sampling: Sampling, generator) -> torch.Tensor:
    logits = logits.float().cpu()
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(sampling.probs(logits), 1, generator=generator)[:, 0]


def _speculative_sampling(p_logits, drafts, draft_probs, sampling, generator):
    """Speculative sampling over a block: how many drafts each row keeps, and the next t0.

    ``p_logits`` (B, n, V): head 1 after each block token; ``drafts`` (B, n-1) were drawn from
    ``draft_probs`` (B, n-1, V). Draft k is kept with probability min(1, p_k(d)/q_k(d)); the first
    rejected one is replaced by a sample of normalise(max(0, p_k - q_k)); if all are kept, the
    next token is drawn from head 1's distribution after the last one.
    """
    batch, n = p_logits.shape[0], p_logits.shape[1]
    p = sampling.probs(p_logits)  # (B, n, V)
    p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # (B, n-1): p_k(d_k)
    q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(p_d.shape, generator=generator)
    keep = (u * q_d <= p_d).long().cumprod(dim=1)  # u < p/q without dividing by a zero q
    n_kept = keep.sum(1)
    t0 = torch.empty(batch, dtype=torch.long)
    for r in range(batch):
        k = int(n_kept[r])
        if k == n - 1:
            dist = p[r, k]
        else:  # the residual distribution: what p puts where q (the draft's) under-covers
            dist = (p[r, k] - draft_probs[r, k]).clamp(min=0)
            dist = dist / dist.sum() if dist.sum() > 0 else p[r, k]
        t0[r] = torch.multinomial(dist, 1, generator=generator)[0]
    return n_kept, t0


class _Rows:
    """Per-row bookkeeping: tokens emitted, length in the cache, whether the row is done."""

    def __init__(self, prompts, max_new_tokens, eos_id, n_heads):
        self.batch = len(prompts)
        self.lengths = torch.tensor([len(p) for p in prompts])  # tokens of the row in the cache
        self.new: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * self.batch
        self.max_new, self.eos_id = max_new_tokens, eos_id
        self.forwards, self.steps = 0, 0
        self.accepted = [0] * n_heads

    def active(self) -> bool:
        return not all(self.done)

    def last_token_of_every_row(self) -> bool:
        """Whether every unfinished row needs exactly one more token."""
        return all(len(self.new[r]) == self.max_new - 1 for r in range(self.batch) if not self.done[r])

    def emit(self, tokens: list[list[int]], accepted_drafts: list[int]) -> None:
        """Append each row's accepted tokens; a row is done at EOS or ``max_new`` tokens."""
        for r, row_tokens in enumerate(tokens):
            if self.done[r]:
                continue
            self.steps += 1
            for k in range(1 + accepted_drafts[r]):
                self.accepted[k] += 1
            for token in row_tokens:
                self.new[r].append(token)
                self.lengths[r] += 1  # a finished row's length stays within the cache's capacity
                if token == self.eos_id or len(self.new[r]) >= self.max_new:
                    self.done[r] = True
                    break

    def output(self) -> list[list[int]]:
        return [list(t) for t in self.new]

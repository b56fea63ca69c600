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

from megatrain.inference.draft_policy import DraftHistory, make_policy
from megatrain.inference.sequential_drafts import SequentialDrafter
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
    forwards: int  # decoding forwards after the prompt's prefill (catch-up forwards included)
    accepted: list[int] = field(default_factory=list)  # per head: steps its token was kept
    steps: int = 0  # row-steps of decoding (forwards x rows still generating)
    seconds: float = 0.0
    decisions: dict = field(default_factory=dict)  # the draft policy's (speculative decoding)

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


DRAFT_POLICIES = ("adaptive", "always")


class Generator:
    """Greedy or sampled generation from an MTPTransformer, plain or self-speculative."""

    def __init__(self, model: MTPTransformer):
        self.model = model.eval()
        self.n = model.n_future
        self.capacity = model.rope_cos.shape[0]
        self._draft_history: dict[int, DraftHistory] = {}  # batch size -> what the draft policy learnt

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling | None = None,
                 speculative: bool = False, eos_id: int | None = None,
                 draft_policy: str = "adaptive") -> Generation:
        """``draft_policy`` (speculative only): "adaptive" verifies per row as many drafts as pay
        (draft_policy.py), "always" every draft on every forward."""
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
        decisions = {}
        if speculative:
            history = self._draft_history.setdefault(len(prompts), DraftHistory())  # kept across calls
            policy = make_policy(draft_policy, self.n, len(prompts), history)
            _SpeculativeDecoding(self, state, cache, sampling, generator, policy).run(prompts)
            decisions = {"policy": policy.name, **policy.decisions.as_dict()}
        else:
            logits = self._prefill(prompts, cache, all_heads=False)
            self._plain(state, cache, logits[0], sampling, generator)
        return Generation(state.output(), state.forwards, state.accepted, state.steps,
                          time.perf_counter() - started, decisions)

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

    def _logits_at(self, head_out: torch.Tensor, at: torch.Tensor, head: int = 0) -> torch.Tensor:
        """Logits (B, V) of ``head`` (default head 1) at block position ``at`` (B,) of each row, on
        the model's device (``_pick`` takes a greedy token there and copies only the ids)."""
        rows = torch.arange(head_out.shape[0], device=head_out.device)
        return self.model.logits(head_out[rows, at.to(head_out.device)], head)

    def _prompt_block(self, prompts):
        """The prompts right-padded into one block: tokens and positions (B, W) on the model's
        device, and each row's last prompt position (B,) on the CPU."""
        device = self.model.rope_cos.device
        width = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = torch.tensor(p, device=device)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        return tokens, positions, torch.tensor([len(p) - 1 for p in prompts])

    def _prefill(self, prompts, cache, all_heads: bool) -> list[torch.Tensor]:
        """Run the prompts (right-padded) in one forward; logits at each row's last prompt token."""
        tokens, positions, last = self._prompt_block(prompts)
        outs = self._forward(tokens, positions, cache, all_heads)
        return [self._logits_at(out, last, i) for i, out in enumerate(outs)]  # each (B, V)

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


class _SpeculativeDecoding:
    """One self-speculative generation: t0 from head 1, drafts from heads 2..n, verified in blocks
    whose width the draft policy picks; plain forwards (and the extra heads' catch-up) where it
    picks none. Sequential MTP modules draft in a chain after each forward instead
    (``SequentialDrafter``), the same catch-up included."""

    def __init__(self, gen: Generator, state, cache: ModelCache, sampling: Sampling, generator, policy):
        self.gen, self.model, self.n = gen, gen.model, gen.n
        self.state, self.cache, self.policy = state, cache, policy
        self.sampling, self.generator = sampling, generator
        self.device = self.model.rope_cos.device
        # The extra heads skip plain forwards; what they will read there waits here (what the
        # first extra head reads: the trunk output, or head 1's output for causal heads) with its
        # positions, until drafting resumes (``_catch_up``).
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.prompt_waiting = False  # waiting[0] is the prompt (``_prefill_without_drafts``)
        self.plain_waiting, self.prompt_width = 0, 0  # the sequential chain's catch-up, to charge it
        # anticausal heads: head 1 reads head 2 (and so on): every forward runs them all anyway
        self.extra_heads_always_run = self.model.head_type == "anticausal"
        self.sequential = self.model.layout.sequential
        self.drafter = SequentialDrafter(self.model, state.batch, cache.capacity, cache) \
            if self.sequential else None

    def run(self, prompts) -> None:
        state = self.state
        if self.sequential:
            t0 = self._sequential_prefill(prompts)
            drafts = None  # the chain drafts (and catches up on the prompt) when a verify needs them
            if self.policy.may_draft(list(range(state.batch))):
                drafts, draft_probs = self._chain_drafts(t0)
            else:
                self.prompt_waiting, self.prompt_width = True, max(len(p) for p in prompts)
        elif self.extra_heads_always_run or self.policy.may_draft(list(range(state.batch))):
            outs = self.gen._prefill(prompts, self.cache, all_heads=True)
            t0 = _pick(outs[0], self.sampling, self.generator)
            drafts, draft_probs = self._draft(torch.stack(outs[1:], dim=1))
        else:  # the first forwards will be plain: the extra heads read the prompt when they draft
            t0, drafts = self._prefill_without_drafts(prompts), None
        while state.active():
            if state.last_token_of_every_row():  # t0 is head 1's own: no verify forward needed
                state.emit([[int(t)] for t in t0.tolist()], accepted_drafts=[0] * state.batch)
                break
            active = [r for r in range(state.batch) if not state.done[r]]
            limits = self.policy.choose(active)
            if not any(limits.values()) and not self.extra_heads_always_run:
                t0 = self._plain_step(t0)
                drafts = None
                continue
            if drafts is None:  # after plain forwards: the extra heads catch up, then draft
                drafts, draft_probs = self._catch_up(t0)
            t0, drafts, draft_probs = self._verify_step(t0, drafts, draft_probs, limits)

    # ---- the three kinds of forward ---------------------------------------------------------------
    def _prefill_without_drafts(self, prompts) -> torch.Tensor:
        """The prompts through the trunk and head 1 only (what the extra heads would read waits, as
        after a plain forward); head 1's pick after each prompt.

        The waiting block must be rectangular, so a shorter row's padding columns repeat its last
        prompt token's input and position: the catch-up then writes the same keys and values there
        twice (so it does not matter which write wins), and its last column is each row's last
        prompt position, where the first drafts are read."""
        tokens, positions, last = self.gen._prompt_block(prompts)
        self.cache.at(positions)
        hidden = self.model.trunk(tokens, self.cache)
        out = self.model.head_forward(0, hidden, self.cache)
        feed = out if self.model.heads_are_chained else hidden
        real = torch.minimum(positions, last.to(self.device)[:, None])
        rows = torch.arange(len(prompts), device=self.device)[:, None]
        self.waiting.append((real, feed[rows, real]))
        self.prompt_waiting = True
        return _pick(self.gen._logits_at(out, last), self.sampling, self.generator)

    def _plain_step(self, t0: torch.Tensor) -> torch.Tensor:
        state = self.state
        state.emit([[int(t)] for t in t0.tolist()], accepted_drafts=[0] * state.batch)
        positions = (state.lengths[:, None] - 1).to(self.device)  # the token just emitted
        started = time.perf_counter()
        self.cache.at(positions)
        hidden = self.model.trunk(t0[:, None].to(self.device), self.cache)
        out = self.model.head_forward(0, hidden, self.cache)
        logits = self.gen._logits_at(out, torch.zeros(state.batch, dtype=torch.long))
        self.policy.measured(1, False, time.perf_counter() - started)
        self.policy.decisions.count(1)
        state.forwards += 1
        if self.sequential:  # the depths read the trunk output there when drafting resumes
            self.drafter.record(positions, t0[:, None], hidden)
            self.plain_waiting += 1
        else:
            self.waiting.append((positions, out if self.model.heads_are_chained else hidden))
        return _pick(logits, self.sampling, self.generator)

    def _catch_up(self, t0: torch.Tensor):
        """Run the extra heads over the positions they skipped (one batched forward); their
        outputs at the last of them are the drafts for the next block (t0 following it)."""
        if self.sequential:  # the chain's own round catches its depths up
            started = time.perf_counter()
            drafts = self._chain_drafts(t0)
            # the plain forwards' share is charged to them; the prompt's is the prefill's
            plain, prompt = self.plain_waiting, self.prompt_width if self.prompt_waiting else 0
            if plain:
                seconds = (time.perf_counter() - started) * plain / (plain + prompt)
                self.policy.charge_catch_up(seconds, plain)
            self.plain_waiting, self.prompt_waiting = 0, False
            self.policy.decisions.catch_ups += 1
            self.state.forwards += 1
            return drafts
        positions = torch.cat([p for p, _ in self.waiting], dim=1)
        inputs = torch.cat([x for _, x in self.waiting], dim=1)
        started = time.perf_counter()
        self.cache.at(positions)
        outs = self.model.extra_head_outputs(inputs, self.cache)
        last = torch.full((self.state.batch,), inputs.shape[1] - 1, dtype=torch.long)
        drafts = self._draft(self._extra_logits(outs, last))
        # The plain forwards' share is charged to them; the prompt's share is what a prefill of
        # every head would have cost anyway.
        plain = len(self.waiting) - self.prompt_waiting
        share = plain / positions.shape[1] if self.prompt_waiting else 1.0
        seconds = (time.perf_counter() - started) * share
        self.policy.charge_catch_up(seconds, plain)
        self.policy.decisions.catch_ups += 1
        self.state.forwards += 1
        self.waiting, self.prompt_waiting = [], False
        return drafts

    def _verify_step(self, t0, drafts, draft_probs, limits: dict[int, int]):
        state, batch = self.state, self.state.batch
        width = 1 + max(limits.values())
        limit = torch.tensor([limits.get(r, 0) for r in range(batch)])
        block = torch.cat([t0[:, None], drafts[:, :width - 1]], dim=1)  # (B, W): t0, d1 .. d_{W-1}
        positions = state.lengths[:, None] + torch.arange(width)  # t0 sits at the row's length
        started = time.perf_counter()
        all_heads = not self.sequential  # the sequential depths draft after it, in their chain
        outs = self.gen._forward(block.to(self.device), positions.to(self.device), self.cache, all_heads)
        logits = self.model.logits(outs[0])  # (B, W, V): head 1 after each block token
        if self.sampling.greedy:
            predicted = logits.argmax(-1).cpu()  # (B, W): only the ids leave the device
            kept = (block[:, 1:] == predicted[:, :-1]).long().cumprod(dim=1).sum(1)
            n_kept = torch.minimum(kept, limit)
            t0_next = predicted[torch.arange(batch), n_kept]
        else:
            n_kept, t0_next = _speculative_sampling(logits.float().cpu(), block[:, 1:],
                                                    draft_probs[:, :width - 1], self.sampling,
                                                    self.generator, limit)
        state.forwards += 1
        emitted = [[int(t0[r])] + block[r, 1:1 + int(n_kept[r])].tolist() for r in range(batch)]
        for r in limits:
            self.policy.observe(r, int(limit[r]), int(n_kept[r]))
        state.emit(emitted, accepted_drafts=n_kept.tolist())
        if self.sequential:
            self.drafter.record(positions, block, outs[0])  # rejected positions: overwritten later
            drafts, draft_probs = self._chain_drafts(t0_next)
        else:  # heads 2..n draft after the last kept token: only there are they unembedded
            drafts, draft_probs = self._draft(self._extra_logits(outs[1:], n_kept))
        self.policy.measured(width, True, time.perf_counter() - started)
        self.policy.decisions.count(width)
        return t0_next, drafts, draft_probs

    # ---- sequential modules ------------------------------------------------------------------------
    def _sequential_prefill(self, prompts) -> torch.Tensor:
        """The prompts' forward (right-padded), recorded for the depths; head 1's pick after each."""
        tokens, positions, last = self.gen._prompt_block(prompts)
        self.cache.at(positions)
        hidden = self.model.trunk(tokens, self.cache)
        self.drafter.record(positions, tokens, hidden)
        return _pick(self.gen._logits_at(hidden, last), self.sampling, self.generator)

    def _chain_drafts(self, t0: torch.Tensor):
        """The depths' drafts after the last token in the cache (P = length - 1), t0 following it."""
        return self.drafter.draft(self.state.lengths - 1, t0, self._pick_draft)

    def _pick_draft(self, logits: torch.Tensor):
        """One depth's draft per row (on the CPU, like every token here) and its distribution."""
        if self.sampling.greedy:
            return logits.argmax(-1).cpu(), None
        probs = self.sampling.probs(logits.float().cpu())
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0], probs

    def _extra_logits(self, outs: list[torch.Tensor], at: torch.Tensor) -> torch.Tensor:
        """Heads 2..n's logits (B, n-1, V) at block position ``at`` (B,) of each row, in one
        unembedding (the parallel heads share the norm and ``output``; replicated heads: one each)."""
        rows, at = torch.arange(outs[0].shape[0], device=outs[0].device), at.to(outs[0].device)
        if self.model.layout.replicated:
            return torch.stack([self.model.logits(out[rows, at], i) for i, out in enumerate(outs, 1)], dim=1)
        return self.model.logits(torch.stack([out[rows, at] for out in outs], dim=1))

    def _draft(self, logits: torch.Tensor):
        """Heads 2..n's tokens from their logits (B, n-1, V): (B, n-1), and the distributions
        they were drawn from (sampling only)."""
        if self.sampling.greedy:
            return logits.argmax(-1).cpu(), None
        probs = self.sampling.probs(logits.float().cpu())  # (B, n-1, V)
        tokens = torch.stack([torch.multinomial(probs[:, k], 1, generator=self.generator)[:, 0]
                              for k in range(probs.shape[1])], dim=1)
        return tokens, probs


def _pick(logits: torch.Tensor, sampling: Sampling, generator) -> torch.Tensor:
    """A token per row from logits (B, V): greedy on the logits' device, sampled on the CPU (its
    generator, so a seed gives the same tokens on any device)."""
    if sampling.greedy:
        return logits.argmax(-1).cpu()
    return torch.multinomial(sampling.probs(logits.float().cpu()), 1, generator=generator)[:, 0]


def _speculative_sampling(p_logits, drafts, draft_probs, sampling, generator, limit=None):
    """Speculative sampling over a block: how many drafts each row keeps, and the next t0.

    ``p_logits`` (B, W, V): head 1 after each block token; ``drafts`` (B, W-1) were drawn from
    ``draft_probs`` (B, W-1, V). Draft k is kept with probability min(1, p_k(d)/q_k(d)); the first
    rejected one is replaced by a sample of normalise(max(0, p_k - q_k)); if all verified drafts
    are kept (all W-1, or the row's ``limit``: the drafts its policy chose to verify), the next
    token is drawn from head 1's distribution after the last one.
    """
    batch, n = p_logits.shape[0], p_logits.shape[1]
    limit = torch.full((batch,), n - 1) if limit is None else limit
    p = sampling.probs(p_logits)  # (B, W, V)
    p_d = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # (B, W-1): p_k(d_k)
    q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(p_d.shape, generator=generator)
    keep = (u * q_d <= p_d).long().cumprod(dim=1)  # u < p/q without dividing by a zero q
    n_kept = torch.minimum(keep.sum(1), limit)
    t0 = torch.empty(batch, dtype=torch.long)
    for r in range(batch):
        k = int(n_kept[r])
        if k == int(limit[r]):  # every draft it verified was kept: a fresh draw from head 1
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

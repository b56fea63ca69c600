"""How many drafts self-speculative decoding verifies: decided per row from what gets accepted.

Verifying t0 and k drafts costs more than a plain forward: the block's k + 1 tokens go through the
trunk, and the extra heads run (their layers, their unembedding where they draft). It pays only
while enough drafts are kept. ``AdaptiveDrafts`` keeps, per row and per depth j, how often draft j
was kept given that drafts 1..j-1 were (exponentially weighted: what a row's text does changes),
and the measured seconds of each kind of forward; before each forward it picks, for every row, the
k that maximises expected tokens per second:

    E(k) = 1 + p_1 + p_1 p_2 + ... + p_1 ... p_k        (tokens a forward emits)
    k*   = argmax_k E(k) / cost(k)                      (cost(0): a plain forward)

The batch's block is as wide as its widest row needs; a row that chose fewer drafts keeps at most
that many, so what it emits never depends on the other rows. When no row wants drafts, decoding is
plain (the extra heads do not run; they catch up in one batched forward when drafting resumes),
and every ``probe_every`` plain forwards one verify of every draft re-measures the rows. A probe
that finds the drafts still not worth it doubles the interval (up to ``max_probe_every``), so on a
model whose drafts are never kept the overhead shrinks toward that of plain decoding.

What one generation learns is kept for the next ones of the same ``Generator`` (``DraftHistory``):
the measured costs, each depth's acceptance over all rows so far (a new row starts from it, weighed
as ``PRIOR_TRIED`` tries, instead of from "kept half the time") and the probe interval. Without it
every prompt paid for finding out again: on a token-level n=4 model whose drafts were kept 10% of
the time, 96 new tokens per prompt took 6 verifies, 4 probes and 5 catch-up forwards besides 87
plain ones, 0.89x plain decoding's speed.

``AlwaysDraft`` verifies every draft on every forward (the fixed policy of the paper's
blockwise parallel decoding), for comparison and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_KEPT, PRIOR_TRIED = 1.0, 2.0  # a draft's prior: kept half the time, weighed as two tries
DECAY = 0.9  # weight of the past in each acceptance estimate, per verify that tested it
HISTORY_DECAY = 0.99  # the same for the model-wide estimate a new row starts from
COST_DECAY = 0.8
MIN_PROBE_EVERY, MAX_PROBE_EVERY = 8, 128


@dataclass
class DraftHistory:
    """What earlier generations of one model taught the adaptive policy (kept by the Generator):
    forward costs by block width, per-depth acceptance over every row so far, the probe interval."""

    costs: dict[int, float] = field(default_factory=dict)
    kept: list[float] = field(default_factory=list)
    tried: list[float] = field(default_factory=list)
    probe_every: int = MIN_PROBE_EVERY

    def prior(self, n_drafts: int) -> list[float]:
        """Per depth, the acceptance a new row starts from."""
        if len(self.kept) != n_drafts:
            self.kept, self.tried = [0.0] * n_drafts, [0.0] * n_drafts
        return [(k + PRIOR_KEPT) / (t + PRIOR_TRIED) for k, t in zip(self.kept, self.tried)]

    def observe(self, depth: int, kept: bool) -> None:
        self.kept[depth] = HISTORY_DECAY * self.kept[depth] + float(kept)
        self.tried[depth] = HISTORY_DECAY * self.tried[depth] + 1.0


@dataclass
class Decisions:
    """What a generation's policy did: forwards by width (1 = plain), probes, catch-ups."""

    widths: dict[int, int] = field(default_factory=dict)
    probes: int = 0
    catch_ups: int = 0

    def count(self, width: int) -> None:
        self.widths[width] = self.widths.get(width, 0) + 1

    def as_dict(self) -> dict:
        return {"forwards_by_block_width": dict(sorted(self.widths.items())), "probes": self.probes,
                "catch_up_forwards": self.catch_ups}


class AlwaysDraft:
    """Verify every draft on every forward."""

    name = "always"

    def __init__(self, n_future: int, batch: int, history: DraftHistory | None = None):
        self.n_drafts, self.decisions = n_future - 1, Decisions()

    def choose(self, active: list[int]) -> dict[int, int]:
        return dict.fromkeys(active, self.n_drafts)

    def may_draft(self, active: list[int]) -> bool:
        return True

    def observe(self, row: int, verified: int, kept: int) -> None:
        pass

    def measured(self, width: int, heads: bool, seconds: float) -> None:
        pass

    def charge_catch_up(self, seconds: float, plain_forwards: int) -> None:
        pass


class AdaptiveDrafts:
    """Per-row draft counts from acceptance and measured forward costs (module docstring)."""

    name = "adaptive"

    def __init__(self, n_future: int, batch: int, history: DraftHistory | None = None):
        """``history``: what earlier generations of this model at this batch size measured,
        updated here; the Generator passes the same one to each of its generations."""
        self.n_drafts = n_future - 1
        self.history = DraftHistory() if history is None else history
        prior = self.history.prior(self.n_drafts)
        self.kept = [[PRIOR_TRIED * p for p in prior] for _ in range(batch)]
        self.tried = [[PRIOR_TRIED] * self.n_drafts for _ in range(batch)]
        self.costs = self.history.costs
        self.plain_in_a_row = 0
        self.decisions = Decisions()

    # ---- estimates -----------------------------------------------------------------------------
    def acceptance(self, row: int) -> list[float]:
        """p_j for j = 1..n-1: draft j kept, given drafts 1..j-1 were."""
        return [k / t for k, t in zip(self.kept[row], self.tried[row])]

    def expected_tokens(self, row: int, k: int) -> float:
        total, run = 1.0, 1.0
        for p in self.acceptance(row)[:k]:
            run *= p
            total += run
        return total

    def cost(self, width: int) -> float | None:
        """Measured seconds of a forward of ``width`` tokens per row; unmeasured verify widths are
        interpolated between the plain cost and the widest measured one (pessimistically the
        widest's own cost when nothing narrower is known)."""
        if width in self.costs:
            return self.costs[width]
        verify = {w: c for w, c in self.costs.items() if w > 1}
        if 1 not in self.costs or not verify:
            return None
        widest = max(verify)
        if width > widest:
            return verify[widest]
        return self.costs[1] + (verify[widest] - self.costs[1]) * (width / widest)

    # ---- decisions -----------------------------------------------------------------------------
    def best_drafts(self, row: int) -> int:
        # what neither kind costs is measured first: a plain forward, then a verify of every draft
        if 1 not in self.costs:
            return 0
        costs = [self.cost(k + 1) for k in range(self.n_drafts + 1)]
        if any(c is None for c in costs):
            return self.n_drafts
        rates = [self.expected_tokens(row, k) / costs[k] for k in range(self.n_drafts + 1)]
        return max(range(self.n_drafts + 1), key=lambda k: rates[k])

    def may_draft(self, active: list[int]) -> bool:
        """Whether the next ``choose`` could ask for drafts (no decision is taken or counted): the
        prefill runs the extra heads only then."""
        return any(self.best_drafts(r) for r in active) or self.plain_in_a_row >= self.history.probe_every

    def choose(self, active: list[int]) -> dict[int, int]:
        """Drafts to verify per active row; all 0 means a plain forward."""
        choice = {r: self.best_drafts(r) for r in active}
        if any(choice.values()):
            self.plain_in_a_row = 0
            return choice
        self.plain_in_a_row += 1
        if self.plain_in_a_row <= self.history.probe_every:
            return choice
        # a probe: every draft once more, so that rows whose text changed can show it
        self.decisions.probes += 1
        self.plain_in_a_row = 0
        self.history.probe_every = min(2 * self.history.probe_every, MAX_PROBE_EVERY)
        return dict.fromkeys(active, self.n_drafts)

    def observe(self, row: int, verified: int, kept: int) -> None:
        """Of ``verified`` drafts of ``row``, the first ``kept`` were kept."""
        for j in range(min(kept + 1, verified)):  # depth j was tried only if 0..j-1 were kept
            self.kept[row][j] = DECAY * self.kept[row][j] + (1.0 if j < kept else 0.0)
            self.tried[row][j] = DECAY * self.tried[row][j] + 1.0
            self.history.observe(j, j < kept)
        if verified and self.best_drafts(row):
            self.history.probe_every = MIN_PROBE_EVERY  # drafting pays again: probe often next time

    def measured(self, width: int, heads: bool, seconds: float) -> None:
        """A forward of ``width`` tokens per row took ``seconds`` (``heads``: the extra heads ran).
        Plain forwards that catch the extra heads up later are charged their share then."""
        old = self.costs.get(width)
        self.costs[width] = seconds if old is None else COST_DECAY * old + (1 - COST_DECAY) * seconds

    def charge_catch_up(self, seconds: float, plain_forwards: int) -> None:
        """The extra heads caught up on ``plain_forwards`` positions in ``seconds``: part of what
        those plain forwards cost."""
        if plain_forwards and 1 in self.costs:
            self.costs[1] += (1 - COST_DECAY) * seconds / plain_forwards


def make_policy(name: str, n_future: int, batch: int, history: DraftHistory | None = None):
    policies = {"adaptive": AdaptiveDrafts, "always": AlwaysDraft}
    if name not in policies:
        raise ValueError(f"draft policy {name!r} is not one of {', '.join(policies)}")
    return policies[name](n_future, batch, history)

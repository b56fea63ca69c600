"""Inference: KV cache == full forward, self-speculative greedy == greedy, speculative sampling
keeps head 1's distribution, and a trained run's checkpoint loads whatever its layout."""

import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.inference.generate import Generator, Sampling
from megatrain.model.kv_cache import ModelCache
from megatrain.model.mtp import MTPTransformer
from megatrain.mtp_loss import build_head_targets, head_scales, mtp_loss

# one worker: the module's `trained` fixture (six small models, ~17 s) would be trained by each
pytestmark = pytest.mark.xdist_group("inference_trained_models")
# sequential: model.mtp_kind
HEAD_TYPES = ["transformer", "causal", "anticausal", "linear", "replicated", "sequential"]
VOCAB = 16


def _cfg(head_type="transformer", n_future=3, **kw):
    base = dict(n_layers=5, n_future=n_future, dim=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                multiple_of=16, head_type=head_type)
    if head_type == "sequential":  # 3 trunk layers and n_future - 1 depths on top
        base.update(head_type="transformer", mtp_kind="sequential", n_layers=3)
    return ModelConfig(**{**base, **kw})


def _counting(batch, length, generator, vocab=VOCAB):
    """Sequences that count up by a row-specific step mod ``vocab``: every head can learn them."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def fit_counting(model, n_future, steps, generator, vocab=VOCAB):
    """Train ``model``'s heads on the counting task (the losses summed unweighted)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        window = _counting(16, 25, generator, vocab)
        targets = build_head_targets(window, n_future)
        scales = head_scales((targets != -100).flatten(1).sum(1), [1.0] * n_future)
        loss, _ = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales, impl="torch")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _trained(head_type, n_future=3, steps=60):
    """A tiny model whose heads have learned the counting task (so drafts get accepted)."""
    torch.manual_seed(0)
    model = MTPTransformer(_cfg(head_type, n_future), max_seq_len=96)
    fit_counting(model, n_future, steps, torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return {head_type: _trained(head_type) for head_type in HEAD_TYPES}


@pytest.mark.parametrize("head_type", HEAD_TYPES[:4])  # sequential depths: the drafts test below
def test_prefill_and_cached_steps_equal_a_full_forward(head_type):
    torch.manual_seed(0)
    model = MTPTransformer(_cfg(head_type), max_seq_len=64, seed=3).eval()
    tokens = torch.randint(0, VOCAB, (3, 20))
    full = model(tokens, return_all_heads=True)  # (B, T, n, V)
    cache = ModelCache.for_model(model, 3, 40)
    parts = []
    for lo, hi in ((0, 11), (11, 12), (12, 20)):  # prefill, one token, a block
        cache.at(torch.arange(lo, hi).expand(3, hi - lo))
        outs = model.head_outputs(model.trunk(tokens[:, lo:hi], cache), cache)
        parts.append(torch.stack([model.logits(o) for o in outs], dim=-2))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["adaptive", "always"])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_greedy_is_greedy_token_for_token_with_rows_accepting_differently(head_type, policy,
                                                                                     trained, monkeypatch):
    model = trained[head_type]
    g = torch.Generator().manual_seed(5)
    in_task = _counting(3, 7, g).tolist()
    off_task = torch.randint(0, VOCAB, (2, 5), generator=g).tolist()  # drafts rarely agree here
    prompts = in_task + off_task + [[4]]
    generator = Generator(model)
    for batch in (1, len(prompts)):  # verifying is cheap here: what the policy drafts is deterministic
        _fixed_costs(generator, monkeypatch, batch, {1: 1.0, 2: 1.1, 3: 1.2})
    plain = generator.generate(prompts, 40)
    spec = generator.generate(prompts, 40, speculative=True, draft_policy=policy)
    assert spec.tokens == plain.tokens
    for row in range(len(prompts)):  # one row alone: the same tokens as in the batch
        alone = generator.generate(prompts[row:row + 1], 40, speculative=True, draft_policy=policy)
        assert alone.tokens[0] == plain.tokens[row]
    assert plain.tokens_per_forward == 1.0
    assert spec.accepted_per_head[0] == 1.0 and len(spec.accepted_per_head) == 3
    if policy == "always":  # the heads learned the task: most drafts are kept, far fewer forwards
        assert spec.tokens_per_forward > 2.0, (spec.tokens_per_forward, spec.accepted_per_head)
        assert spec.forwards < plain.forwards / 1.8
    else:  # how many it verifies is the policy's cost-based choice; it does draft here
        assert spec.tokens_per_forward > 1.3 and max(spec.decisions["forwards_by_block_width"]) == 3


def test_speculative_greedy_equals_greedy_for_an_untrained_model_with_eos():
    """Random heads: drafts are mostly rejected, every row rolls back; EOS ends a row early."""
    torch.manual_seed(0)
    model = MTPTransformer(_cfg(n_future=4, n_layers=6), max_seq_len=96, seed=7).eval()
    generator = Generator(model)
    prompts = [[1, 2, 3], [5], [9, 9, 9, 9, 9, 9]]
    plain = generator.generate(prompts, 30)
    eos = plain.tokens[0][5]
    plain = generator.generate(prompts, 30, eos_id=eos)
    spec = generator.generate(prompts, 30, eos_id=eos, speculative=True)
    assert spec.tokens == plain.tokens and plain.tokens[0][-1] == eos and len(plain.tokens[0]) <= 6


def test_speculative_decoding_skips_a_verify_forward_when_every_row_needs_one_token():
    """The last token of every row is head 1's own pick from the previous forward: verifying
    drafts that nobody will keep would be a wasted forward."""
    torch.manual_seed(0)
    model = MTPTransformer(_cfg(n_future=4, n_layers=6), max_seq_len=96, seed=7).eval()
    generator = Generator(model)
    prompts = [[1, 2, 3], [5]]
    one = generator.generate(prompts, 1, speculative=True)
    assert one.forwards == 0 and one.tokens == generator.generate(prompts, 1).tokens
    for new in (2, 5, 9):  # random heads: about one token per forward, the last one free
        plain = generator.generate(prompts, new)
        spec = generator.generate(prompts, new, speculative=True, draft_policy="always")
        assert spec.tokens == plain.tokens
        assert spec.forwards <= plain.forwards


def test_sequential_drafts_are_what_the_whole_model_predicts_at_every_step(monkeypatch):
    """Each round of chained drafts (depth k from depth k-1 and Emb of the token before) equals
    the depth-k predictions of one full forward over the emitted tokens, t0 and the drafts so far,
    whatever the rounds before accepted or rejected: the KV caches' final and provisional entries
    (sequential_drafts.py) are kept right. Rows of different lengths; plain forwards in between
    (the catch-up). Greedy output equals plain greedy."""
    from megatrain.inference.sequential_drafts import SequentialDrafter

    model = MTPTransformer(_cfg("sequential", n_future=4), max_seq_len=96, seed=7).eval()
    checked = []
    original = SequentialDrafter.draft

    def checking_draft(self, last, t0, pick):
        drafts, probs = original(self, last, t0, pick)
        depths = self.depths
        for r in range(drafts.shape[0]):
            p = int(last[r])
            sequence = self.tokens[r:r + 1, :p + depths + 1]  # x_0 .. x_P, t0, d_1 .. d_{D-1}
            with torch.no_grad():
                full = model(sequence, return_all_heads=True)[0, p]  # (n, V) at position P
            want = full[1:].argmax(-1)
            assert drafts[r].tolist() == want.tolist(), (r, p, drafts[r], want)
            checked.append(p)
        return drafts, probs

    monkeypatch.setattr(SequentialDrafter, "draft", checking_draft)
    generator = Generator(model)
    prompts = [[1, 2, 3], [5], [9, 9, 9, 9, 9, 9]]
    plain = generator.generate(prompts, 30)
    for policy in ("always", "adaptive"):
        if policy == "adaptive":  # drafts rarely pay at twice a plain forward: plain steps, probes
            _fixed_costs(generator, monkeypatch, 3, {1: 1.0, 2: 1.7, 3: 1.9, 4: 2.0})
        spec = generator.generate(prompts, 30, speculative=True, draft_policy=policy)
        assert spec.tokens == plain.tokens
        if policy == "adaptive":
            assert spec.decisions["catch_up_forwards"] >= 1 and 1 in spec.decisions["forwards_by_block_width"]
    assert len(checked) > 40


def _fixed_costs(generator, monkeypatch, batch, costs):
    """The policy's forward costs held at ``costs`` (seconds by block width): its decisions then
    depend on the acceptance alone, not on this machine's timing noise."""
    from megatrain.inference.draft_policy import AdaptiveDrafts

    monkeypatch.setattr(AdaptiveDrafts, "measured", lambda self, *args: None)
    monkeypatch.setattr(AdaptiveDrafts, "charge_catch_up", lambda self, *args: None)
    from megatrain.inference.draft_policy import DraftHistory

    generator._draft_history[batch] = DraftHistory(costs=dict(costs))


TWICE_PLAIN = {1: 1.0, 2: 1.5, 3: 1.8, 4: 2.0}  # a verify of 3 drafts costs two plain forwards


# (not replicated: random unembeddings reading head 1's own hidden state agree with it now and then
# on the looping text of a random model, so their drafts are sometimes kept)
@pytest.mark.parametrize("head_type", [h for h in HEAD_TYPES if h != "replicated"])
def test_adaptive_drafting_turns_to_plain_decoding_where_drafts_are_never_kept(head_type, monkeypatch):
    """Random heads: the policy decodes plainly, probing with a doubling interval (8, 16, 32 ...);
    the extra heads catch up in one forward per probe. The same tokens as plain decoding."""
    model = MTPTransformer(_cfg(head_type, n_future=4, n_layers=6), max_seq_len=160, seed=7).eval()
    generator = Generator(model)
    _fixed_costs(generator, monkeypatch, 1, TWICE_PLAIN)
    plain = generator.generate([[1, 2, 3]], 120)
    spec = generator.generate([[1, 2, 3]], 120, speculative=True)
    assert spec.tokens == plain.tokens
    widths, probes = spec.decisions["forwards_by_block_width"], spec.decisions["probes"]
    verifies = sum(n for w, n in widths.items() if w > 1)
    catch_ups = spec.decisions["catch_up_forwards"]
    assert probes == 3 and verifies == probes, spec.decisions
    if head_type == "anticausal":  # head 1 reads the others: every forward runs them all, no catch-up
        assert catch_ups == 0 and spec.forwards == plain.forwards, spec.decisions
    else:  # each probe costs one catch-up forward of the extra heads, and nothing else
        assert catch_ups == probes and spec.forwards == plain.forwards + probes, spec.decisions


@pytest.mark.parametrize("head_type", ["transformer", "causal", "linear", "replicated"])
def test_a_prefill_without_the_extra_heads_catches_up_to_the_same_drafts_and_caches(head_type):
    """Where the policy will not draft at first, the prompt runs through the trunk and head 1 only
    and the extra heads read it later in their catch-up. Ragged prompts: the catch-up's padding
    columns must give each row the drafts (and extra-head cache entries) of a full prefill."""
    from megatrain.inference.draft_policy import AlwaysDraft
    from megatrain.inference.generate import _Rows, _SpeculativeDecoding

    model = MTPTransformer(_cfg(head_type, n_future=4), max_seq_len=64, seed=3).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3, 4], [5, 6, 7, 8]]

    def first_drafts(lazy: bool):
        gen = Generator(model)
        cache = ModelCache.for_model(model, len(prompts), 32)
        spec = _SpeculativeDecoding(gen, _Rows(prompts, 8, None, gen.n), cache, Sampling(),
                                    torch.Generator(), AlwaysDraft(gen.n, len(prompts)))
        with torch.no_grad():
            if lazy:
                t0 = spec._prefill_without_drafts(prompts)
                drafts, _ = spec._catch_up(t0)
            else:
                outs = gen._prefill(prompts, cache, all_heads=True)
                t0 = outs[0].argmax(-1)
                drafts, _ = spec._draft(torch.stack(outs[1:], dim=1))
        extra = {name: layer.k.clone() for name, layer in cache.layers.items() if "extra" in name}
        return t0, drafts, extra

    t0, drafts, caches = first_drafts(lazy=False)
    t0_lazy, drafts_lazy, caches_lazy = first_drafts(lazy=True)
    assert torch.equal(t0, t0_lazy) and torch.equal(drafts, drafts_lazy)
    assert (bool(caches) or head_type in ("linear", "replicated")) and caches.keys() == caches_lazy.keys()
    for name in caches:
        for r, p in enumerate(prompts):
            torch.testing.assert_close(caches_lazy[name][r, :len(p)], caches[name][r, :len(p)])


def test_the_next_generation_starts_from_what_the_last_one_learnt(monkeypatch):
    """Random heads: the first generation probes at doubling intervals (8, 16, 32); the next one
    goes on from 64 and from the acceptance seen so far, instead of finding out again."""
    model = MTPTransformer(_cfg("transformer", n_future=4, n_layers=6), max_seq_len=160, seed=7).eval()
    generator = Generator(model)
    _fixed_costs(generator, monkeypatch, 1, TWICE_PLAIN)
    first = generator.generate([[1, 2, 3]], 120, speculative=True)
    second = generator.generate([[4, 5, 6]], 120, speculative=True)
    assert first.decisions["probes"] == 3 and second.decisions["probes"] == 1, (first.decisions,
                                                                                 second.decisions)
    assert generator._draft_history[1].prior(3)[0] < 0.25  # below the first prompt's 0.5: never kept
    # the control: a fresh Generator finds out again
    fresh = Generator(model)
    _fixed_costs(fresh, monkeypatch, 1, TWICE_PLAIN)
    assert fresh.generate([[4, 5, 6]], 120, speculative=True).decisions["probes"] == 3


def test_adaptive_drafting_keeps_drafting_where_drafts_are_kept(trained, monkeypatch):
    model = trained["transformer"]
    prompts = _counting(2, 7, torch.Generator().manual_seed(9)).tolist()
    generator = Generator(model)
    _fixed_costs(generator, monkeypatch, 2, {1: 1.0, 2: 1.5, 3: 2.0})
    spec = generator.generate(prompts, 60, speculative=True)
    always = generator.generate(prompts, 60, speculative=True, draft_policy="always")
    assert spec.tokens == always.tokens == generator.generate(prompts, 60).tokens
    widths = spec.decisions["forwards_by_block_width"]
    # the prior (half the drafts kept) does not pay at twice the cost: plain first, until a probe
    # finds the drafts kept; from then on it verifies both
    assert spec.decisions["probes"] == 1 and widths[3] > widths[1], spec.decisions
    assert spec.tokens_per_forward > 1.8, spec.decisions


def test_speculative_sampling_draws_fresh_from_head_1_after_the_drafts_a_row_verified():
    """A row whose policy verified k drafts and kept them all draws its next token from head 1's
    distribution after them, not from the residual of a draft it never verified."""
    from megatrain.inference.generate import _speculative_sampling

    g = torch.Generator().manual_seed(0)
    rows, vocab = 20000, 4
    p_logits = torch.randn(1, 3, vocab, generator=g).expand(rows, 3, vocab)
    drafts = torch.zeros(rows, 2, dtype=torch.long)  # token 0 at both depths
    q = torch.full((rows, 2, vocab), 0.0)
    q[..., 0] = 1.0  # the drafts were certain: a rejection's residual puts nothing on token 0
    sampling = Sampling(temperature=1.0)
    p = sampling.probs(p_logits[0])  # (3, V)
    for limit, position in ((0, 0), (1, 1)):
        n_kept, t0 = _speculative_sampling(p_logits, drafts, q, sampling, g, torch.full((rows,), limit))
        assert int(n_kept.max()) <= limit
        fresh = t0[n_kept == limit]  # every verified draft kept: a fresh draw at `position`
        freq = torch.bincount(fresh, minlength=vocab).float() / len(fresh)
        torch.testing.assert_close(freq, p[position], atol=0.02, rtol=0)


def _pairs(tokens, n_rows):
    counts = torch.zeros(VOCAB, VOCAB)
    for row in tokens[:n_rows]:
        counts[row[0], row[1]] += 1
    return counts / counts.sum()


def test_speculative_sampling_keeps_head_1s_distribution(trained, monkeypatch):
    """The first two sampled tokens of 4000 rows against head 1's exact joint distribution: as
    close as sampling noise allows, like plain sampling; a negative control that keeps every
    draft is far off."""
    import math

    import megatrain.inference.generate as gen

    model, prompt, rows = trained["transformer"], [3, 5, 7], 4000
    warp = Sampling(temperature=1.5, top_p=0.95)  # an uncertain continuation: drafts get rejected
    with torch.no_grad():
        first = warp.probs(model(torch.tensor([prompt]))[0, -1])  # (V,)
        second = warp.probs(model(torch.tensor([prompt + [t] for t in range(VOCAB)]))[:, -1])  # (V, V)
    exact = first[:, None] * second
    noise = 0.5 * (2 * exact * (1 - exact) / (math.pi * rows)).sqrt().sum()  # E[TV] of N samples

    def tv(speculative, seed):
        result = Generator(model).generate([prompt] * rows, 2, speculative=speculative,
                                           sampling=Sampling(1.5, 0.95, seed), draft_policy="always")
        return 0.5 * (_pairs(result.tokens, rows) - exact).abs().sum(), result

    plain_tv, _ = tv(False, 11)
    spec_tv, spec = tv(True, 12)
    assert 0.2 < spec.accepted_per_head[1] < 0.9  # the acceptance rule is really exercised
    assert plain_tv < 1.6 * noise and spec_tv < 1.6 * noise, (plain_tv, spec_tv, noise)

    def keep_everything(p_logits, drafts, draft_probs, sampling, generator, limit=None):
        n_kept = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.long)
        return n_kept, torch.multinomial(sampling.probs(p_logits[:, -1]), 1, generator=generator)[:, 0]

    monkeypatch.setattr(gen, "_speculative_sampling", keep_everything)
    assert tv(True, 12)[0] > 4 * noise


def test_top_p_keeps_the_smallest_nucleus():
    probs = Sampling(temperature=1.0, top_p=0.7).probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_too_long_a_generation_is_refused_clearly():
    model = MTPTransformer(_cfg(), max_seq_len=16).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        Generator(model).generate([[1, 2, 3]], 20)


def test_generate_cli_from_a_run_dir_and_from_its_export(dataset, tmp_path, capsys):
    """`megatrain generate` on a trained run: --json fields, speculative == plain greedy, and the
    Meta export of the same checkpoint generates the same tokens."""
    import json

    from megatrain.cli import main
    from tests.test_trainer import _overrides, _train

    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 4, "model.n_future": 3}))
    capsys.readouterr()
    common = ["--prompt", "def function_3(values", "--max-new-tokens", "12", "--json"]

    def generate(*args):
        assert main(["generate", *args, *common]) == 0
        return json.loads(capsys.readouterr().out)

    plain = generate("--run-dir", str(run))
    spec = generate("--run-dir", str(run), "--speculative")
    always = generate("--run-dir", str(run), "--speculative", "--draft-policy", "always")
    assert spec["tokens"] == always["tokens"] == plain["tokens"] and spec["text"] == plain["text"]
    assert len(plain["tokens"]) == 12 and plain["tokens_per_forward"] == 1.0
    assert len(spec["accepted_per_head"]) == 3 and spec["tokens_per_s"] > 0
    assert spec["decisions"]["policy"] == "adaptive" and always["decisions"]["policy"] == "always"
    assert set(always["decisions"]["forwards_by_block_width"]) == {"3"}  # JSON keys are strings
    assert main(["export", "--run-dir", str(run), "--format", "meta", "--out", str(tmp_path / "meta")]) == 0
    capsys.readouterr()
    assert generate("--from", str(tmp_path / "meta"))["tokens"] == plain["tokens"]
    assert main(["generate", "--run-dir", str(run), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens=0" in capsys.readouterr().err

"""The sequential-heads loss node equals the naive all-logits loss, with gradients."""

from contextlib import nullcontext

import pytest
import torch

import megatrain.mtp_loss
from megatrain.kernels import fused_linear_cross_entropy
from megatrain.model.mtp import MTPTransformer
from megatrain.mtp_loss import build_head_targets, mtp_loss, mtp_loss_naive

# the parallel heads' types, and "sequential": DeepSeek-V3-style chained MTP modules (model.mtp_kind)
HEAD_TYPES = ["transformer", "linear", "causal", "anticausal", "replicated", "sequential"]


def model_kind(head_type: str) -> dict:
    """ModelConfig keys of a HEAD_TYPES entry."""
    return {"mtp_kind": "sequential"} if head_type == "sequential" else {"head_type": head_type}


def tiny_mtp_case(tiny_model_cfg, head_type, n_future, seed=0):
    """A tiny model, a (4, 17) token window, its head targets and per-head loss scales."""
    torch.manual_seed(seed)
    cfg = tiny_model_cfg(**model_kind(head_type), n_future=n_future, n_layers=5)
    model = MTPTransformer(cfg, max_seq_len=16)
    window = torch.randint(0, cfg.vocab_size, (4, 17))
    targets = build_head_targets(window, n_future)
    weights = torch.linspace(1.0, 0.5, n_future)
    scales = weights / (targets != -100).flatten(1).sum(1)
    return model, window, targets, scales


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_sequential(model, window, targets, scales, micro, loss_scale=1.0):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for s in range(0, window.shape[0], micro):
        hidden = model.trunk(window[s:s + micro, :-1])
        loss, _ = mtp_loss(model, hidden, targets[:, s:s + micro], scales)
        (loss * loss_scale).backward()
        total += loss.item()
    return total, _grads(model)


def _run_naive(model, window, targets, scales):
    model.zero_grad(set_to_none=True)
    loss = mtp_loss_naive(model, model.trunk(window[:, :-1]), targets, scales)
    loss.backward()
    return loss.item(), _grads(model)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("n_future", [1, 4])
def test_sequential_heads_match_naive_with_grad_accumulation(tiny_model_cfg, head_type, n_future):
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, head_type, n_future)
    loss_ref, grads_ref = _run_naive(model, window, targets, scales)
    for micro in (4, 2, 1):  # one micro-batch, then gradient accumulation over 2 and 4
        loss, grads = _run_sequential(model, window, targets, scales, micro)
        assert abs(loss - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref)), (micro, loss, loss_ref)
        diff = _max_diff(grads, grads_ref)
        assert diff <= 1e-6, f"micro={micro}: max grad diff {diff}"


@pytest.mark.parametrize("head_type", ["transformer", "causal", "sequential"])
def test_head_gradients_follow_incoming_gradient_scale(tiny_model_cfg, head_type):
    """Loss scaling (e.g. x1024, or 1/accumulation) must scale head *and* trunk gradients."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, head_type, 3)
    _, grads = _run_sequential(model, window, targets, scales, micro=4)
    _, scaled = _run_sequential(model, window, targets, scales, micro=4, loss_scale=1024.0)
    # One call over the whole name -> gradient mapping: a failure names the parameter itself.
    expected = {name: g * 1024.0 for name, g in grads.items()}
    torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-9)


def test_comparison_catches_a_wrong_gradient(tiny_model_cfg):
    """Negative control: a 1% error in one head's weight is visible to the same check."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, "transformer", 3)
    _, grads_ref = _run_naive(model, window, targets, scales)
    wrong = scales.clone()
    wrong[2] *= 1.01
    _, grads = _run_sequential(model, window, targets, wrong, micro=4)
    assert _max_diff(grads, grads_ref) > 1e-6


def autocast_step(model, window, targets, scales, *, impl, autocast_dtype=None, micro=None):
    """A training step's loss and gradients as the trainer runs it: float32 parameters, trunk and
    loss under ``autocast(autocast_dtype)`` when given, backward outside, ``micro``-row
    micro-batches. Device: the model's."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    total, micro = 0.0, micro or window.shape[0]
    for s in range(0, window.shape[0], micro):
        region = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else nullcontext())
        with region:
            hidden = model.trunk(window[s:s + micro, :-1])
            loss, _ = mtp_loss(model, hidden, targets[:, s:s + micro], scales, impl=impl)
        loss.backward()
        total += loss.item()
    return total, _grads(model)


def assert_bf16_step_matches_fp32(bf16, fp32, loss_rtol=0.01, grad_rtol=0.03):
    """bf16 autocast vs float32: losses within ``loss_rtol``, each parameter's gradient within
    ``grad_rtol`` in relative norm (measured: ~1e-5 and ~1% on the tiny model)."""
    (loss16, grads16), (loss32, grads32) = bf16, fp32
    assert abs(loss16 - loss32) <= loss_rtol * abs(loss32), f"bf16 loss {loss16} vs fp32 {loss32}"
    assert grads16.keys() == grads32.keys()
    for name, g in grads32.items():
        assert grads16[name].dtype == g.dtype == torch.float32, name
        rel = ((grads16[name] - g).norm() / g.norm()).item()
        assert rel <= grad_rtol, f"{name}: bf16 gradient differs from fp32 by {rel:.2%} (relative norm)"


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bf16_autocast_step_matches_fp32(tiny_model_cfg, head_type, monkeypatch):
    """The torch loss path under bf16 autocast, gradient accumulation included: it runs (it used
    to fail on dtypes), the heads' cross-entropy gets bf16 hidden and weight (no float32 copy of
    the unembedding per head), and loss and gradients agree with float32."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, head_type, 4)
    seen = []

    def spy(hidden, weight, targets_i, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return fused_linear_cross_entropy(hidden, weight, targets_i, **kwargs)

    monkeypatch.setattr(megatrain.mtp_loss, "fused_linear_cross_entropy", spy)
    fp32 = autocast_step(model, window, targets, scales, impl="torch")
    assert set(seen) == {(torch.float32, torch.float32)}, seen
    seen.clear()
    bf16 = autocast_step(model, window, targets, scales, impl="torch",
                         autocast_dtype=torch.bfloat16, micro=2)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}, seen
    assert_bf16_step_matches_fp32(bf16, fp32)


def test_bf16_comparison_catches_a_wrong_head_weight(tiny_model_cfg):
    """Negative control: one head weighted 5% off (a 1-2% change of the total) fails the check."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, "transformer", 4)
    fp32 = autocast_step(model, window, targets, scales, impl="torch")
    wrong = scales.clone()
    wrong[0] *= 1.05
    bf16 = autocast_step(model, window, targets, wrong, impl="torch", autocast_dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="bf16 loss"):
        assert_bf16_step_matches_fp32(bf16, fp32)


def test_bf16_autocast_eval_matches_fp32(tiny_model_cfg):
    """The forward-only path (evaluation under no_grad) under bf16 autocast."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, "causal", 3)
    losses = []
    for enabled in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss, stats = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales, impl="torch")
        assert torch.isfinite(stats.loss_sum).all()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 0.01 * abs(losses[0]), losses


def test_heads_params_get_no_grad_when_frozen_trunk_only_eval(tiny_model_cfg):
    """Under no_grad the loss runs forward-only and returns the same value."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, "anticausal", 3)
    with torch.no_grad():
        loss_eval, stats = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales)
    loss_ref, _ = _run_naive(model, window, targets, scales)
    assert abs(loss_eval.item() - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref))
    assert stats.n_valid.tolist() == [(targets[i] != -100).sum().item() for i in range(3)]


def test_stats_report_per_head_mean_loss_and_accuracy(tiny_model_cfg):
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, "transformer", 2)
    hidden = model.trunk(window[:, :-1])
    _, stats = mtp_loss(model, hidden, targets, scales)
    logits = torch.stack([model.logits(o) for o in model.head_outputs(hidden)])  # (n, B, T, V)
    for i in range(2):
        mask = targets[i] != -100
        ce = torch.nn.functional.cross_entropy(logits[i][mask], targets[i][mask], reduction="sum")
        hits = (logits[i].argmax(-1)[mask] == targets[i][mask]).sum()
        assert abs(stats.loss_sum[i].item() - ce.item()) < 1e-3
        assert stats.n_correct[i].item() == hits.item()


def test_targets_shift_per_head_and_mask_past_window():
    window = torch.arange(10)[None]  # tokens 0..9: inputs 0..8, T = 9
    targets = build_head_targets(window, 3)
    assert targets.shape == (3, 1, 9)
    assert targets[0, 0].tolist() == list(range(1, 10))
    assert targets[1, 0].tolist() == list(range(2, 10)) + [-100]
    assert targets[2, 0].tolist() == list(range(3, 10)) + [-100, -100]


def test_targets_masked_across_document_boundary():
    eos = 99
    window = torch.tensor([[5, 6, eos, 7, 8, 9]])  # T = 5
    targets = build_head_targets(window, 3, eos_id=eos, mask_cross_document=True)
    # head 1 predicts everything, the EOS included
    assert targets[0, 0].tolist() == [6, eos, 7, 8, 9]
    # head 2 at t=0 predicts EOS (allowed); at t=1 the target 7 lies past the EOS: masked
    assert targets[1, 0].tolist() == [eos, -100, 8, 9, -100]
    # head 3: t=0 -> 7 crosses, t=1 -> 8 crosses, t=2 (input EOS) -> 9: the EOS is the input
    # itself, not between input and target; 7 and 8 lie between and are not EOS: kept
    assert targets[2, 0].tolist() == [-100, -100, 9, -100, -100]
    plain = build_head_targets(window, 3, eos_id=eos, mask_cross_document=False)
    assert plain[1, 0].tolist() == [eos, 7, 8, 9, -100]


@pytest.mark.parametrize("concat", ["embedding_first", "hidden_first"])
def test_sequential_depths_follow_the_deepseek_v3_recurrence(tiny_model_cfg, concat):
    """Depth k at position t: block_k(eh_proj([enorm(Emb(x_{t+k})); hnorm(hbar^{k-1}_t)])), hbar^0
    = the trunk output after the final norm, hbar^k after depth k's own norm (the order the exported
    modules must keep, docs/design.md). Negative control: the other concatenation order differs."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg(mtp_kind="sequential", n_future=3, n_layers=2, mtp_concat=concat)
    model = MTPTransformer(cfg, max_seq_len=16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        got = model(tokens, return_all_heads=True)  # (B, T, 3, V)
        cos, sin = model.rope(9)
        hbar = model.norm(model.trunk(tokens))
        want, swapped = [model.output(hbar)], []
        for k, module in enumerate(model.mtp, start=1):
            nxt = torch.zeros_like(tokens)
            nxt[:, :9 - k] = tokens[:, k:]
            e, h = module.enorm(model.tok_embeddings(nxt)), module.hnorm(hbar)
            pair = [h, e] if concat == "hidden_first" else [e, h]
            out = module.block(module.eh_proj(torch.cat(pair, -1)), cos, sin)
            swapped.append(module.block(module.eh_proj(torch.cat(pair[::-1], -1)), cos, sin))
            hbar = module.norm(out)
            want.append(model.output(hbar))
    torch.testing.assert_close(got, torch.stack(want, dim=2))
    assert (model.output(model.mtp[0].norm(swapped[0])) - want[1]).abs().max() > 1e-3


def test_sequential_depths_read_the_window_tokens_even_where_targets_are_masked():
    from megatrain.mtp_loss import depth_token_ids

    window = torch.tensor([[5, 6, 0, 7, 8, 9]])  # 0 = EOS
    targets = build_head_targets(window, 3, eos_id=0, mask_cross_document=True)
    ids = depth_token_ids(targets[0], 2)
    assert ids[0].tolist() == [[6, 0, 7, 8, 9]]  # depth 1 reads x_{t+1}
    assert ids[1].tolist() == [[0, 7, 8, 9, 0]]  # depth 2 reads x_{t+2}; nothing past the window
    assert targets[1, 0, 1].item() == -100  # this target is masked, its input token is not

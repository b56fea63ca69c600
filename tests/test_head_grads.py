"""Head gradients do not pile up: what the sequential-heads node keeps between a microbatch's
forward and its backward does not grow with the number of microbatches in flight (a pipeline's
GPipe / 1F1B order) nor, in direct mode, beyond ``.grad`` under gradient accumulation; and the
gradients stay exact in every order, including a zero-bubble schedule's split backward."""

import pytest
import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from megatrain.head_grads import HeadGradSink
from megatrain.model.mtp import MTPTransformer
from megatrain.mtp_loss import build_head_targets, mtp_loss, mtp_loss_naive
from megatrain.profiling.live_bytes import LiveBytes
from tests.marks import needs_split_backward

SEQ = 8


def _case(tiny_model_cfg, head_type="transformer", vocab=16384, batch=8):
    """Big heads (a 16384-token unembedding), small activations (one row of 8 tokens per
    microbatch): a set of head gradients outweighs everything a microbatch keeps."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg(head_type=head_type, n_future=3, n_layers=4, vocab_size=vocab)
    model = MTPTransformer(cfg, max_seq_len=SEQ)
    window = torch.randint(0, vocab, (batch, SEQ + 1))
    targets = build_head_targets(window, cfg.n_future)
    scales = 1.0 / (targets != -100).flatten(1).sum(1).float()
    return model, window, targets, scales


def _head_set_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.all_head_params())


def _step(model, window, targets, scales, micro, order, sink_of):
    """One step over microbatches of ``micro`` rows: ``gpipe`` = every forward, then every
    backward; ``1f1b`` = two forwards ahead (a stage before the last); ``accumulate`` = forward,
    backward, next (also the last stage under 1F1B)."""
    starts = list(range(0, window.shape[0], micro))
    ahead = {"gpipe": len(starts), "1f1b": 2, "accumulate": 1}[order]
    waiting = []
    for k, s in enumerate(starts):
        hidden = model.trunk(window[s:s + micro, :-1])
        loss, _ = mtp_loss(model, hidden, targets[:, s:s + micro], scales, sink=sink_of())
        waiting.append(loss)
        if len(waiting) == ahead or k == len(starts) - 1:
            while waiting and (len(waiting) == ahead or k == len(starts) - 1):
                waiting.pop(0).backward()


def _peak_bytes(model, window, targets, scales, micro, order, sink_of) -> int:
    model.zero_grad(set_to_none=True)
    counter = LiveBytes()
    with counter:
        start = counter.reset_peak()
        _step(model, window, targets, scales, micro, order, sink_of)
        return counter.peak - start


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, window, targets, scales):
    model.zero_grad(set_to_none=True)
    mtp_loss_naive(model, model.trunk(window[:, :-1]), targets, scales).backward()
    return _grads(model)


def _assert_grads_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


SINKS = {  # mode -> a factory of the step's "sink for the next node"
    "direct": lambda: (lambda sink: lambda: sink)(HeadGradSink("direct")),
    "shared": lambda: (lambda sink: lambda: sink)(HeadGradSink("shared")),
    # also the negative control of the memory tests: every node keeps its own set until backward
    "per_node": lambda: (lambda sink: lambda: sink)(HeadGradSink("per_node")),
}


def test_gpipe_holds_one_set_of_head_gradients_at_2_and_8_microbatches(tiny_model_cfg):
    """GPipe on the heads' stage: every microbatch's forward before any backward."""
    model, window, targets, scales = _case(tiny_model_cfg)
    head_set = _head_set_bytes(model)
    growth = {mode: _peak_bytes(model, window, targets, scales, 1, "gpipe", make())
              - _peak_bytes(model, window[:2], targets[:, :2], scales, 1, "gpipe", make())
              for mode, make in SINKS.items()}
    # six more microbatches waiting: their trunk activations are small next to one set
    assert growth["direct"] < 0.25 * head_set, (growth, head_set)
    assert growth["shared"] < 0.25 * head_set, (growth, head_set)
    # the control, a node keeping its own set until its backward: one more set per microbatch
    assert growth["per_node"] > 5 * head_set, (growth, head_set)


def test_gradient_accumulation_holds_nothing_beyond_the_grads_in_direct_mode(tiny_model_cfg):
    """Forward, backward, next microbatch: direct mode's peak does not grow from 2 to 8
    microbatches and stays a whole set below the shared mode's, which hands its set to autograd
    on top of .grad (what FSDP and DeepSpeed need)."""
    model, window, targets, scales = _case(tiny_model_cfg)
    head_set = _head_set_bytes(model)
    peak = {(mode, m): _peak_bytes(model, window[:m], targets[:, :m], scales, 1, "accumulate", make())
            for mode, make in SINKS.items() for m in (2, 8)}
    assert peak["direct", 8] - peak["direct", 2] < 0.05 * head_set, (peak, head_set)
    assert peak["shared", 8] - peak["shared", 2] < 0.05 * head_set, (peak, head_set)
    assert peak["shared", 8] - peak["direct", 8] > 0.9 * head_set, (peak, head_set)


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal", "anticausal", "replicated"])
@pytest.mark.parametrize("order", ["gpipe", "1f1b", "accumulate"])
def test_every_sink_and_order_gives_the_whole_batch_gradients(tiny_model_cfg, head_type, order):
    model, window, targets, scales = _case(tiny_model_cfg, head_type, vocab=97, batch=4)
    want = _reference(model, window, targets, scales)
    for make in SINKS.values():
        model.zero_grad(set_to_none=True)
        _step(model, window, targets, scales, 1, order, make())
        _assert_grads_equal(_grads(model), want)


@needs_split_backward
@pytest.mark.parametrize("mode", ["direct", "shared_split", "shared"])
def test_a_zero_bubble_split_backward_gets_exact_head_gradients(tiny_model_cfg, mode):
    """torch's zero-bubble schedules run the node's backward twice: for the stage input's
    gradient only, then for the weights' (its stage_backward_input / stage_backward_weight).
    Here the stage is everything after the embedding; two microbatches, input passes first.
    The control: a shared sink not told of the split hands its set to the input pass, which
    drops it."""
    model, window, targets, scales = _case(tiny_model_cfg, vocab=97, batch=4)
    want = _reference(model, window, targets, scales)
    model.zero_grad(set_to_none=True)
    sink = HeadGradSink("shared", split_backward=True) if mode == "shared_split" else HeadGradSink(mode)
    cos, sin = model.rope(SEQ)
    stage_params = [p for n, p in model.named_parameters() if not n.startswith("tok_embeddings")]
    weight_passes = []
    for s in (0, 2):
        h = stage_input = model.tok_embeddings(window[s:s + 2, :-1]).detach().requires_grad_(True)
        for key in model.layout.trunk_keys:
            h = model.layers[key](h, cos, sin)
        loss, _ = mtp_loss(model, h, targets[:, s:s + 2], scales, sink=sink)
        (grad_in,), groups = stage_backward_input([loss], None, [stage_input], iter(stage_params))
        assert grad_in is not None
        weight_passes.append(groups)
    if mode == "shared":  # the weight pass finds no gradient for the head parameters
        with pytest.raises(RuntimeError, match="not have been used in the graph"):
            stage_backward_weight(iter(stage_params), weight_passes[0])
        return
    for groups in weight_passes:
        stage_backward_weight(iter(stage_params), groups)
    got, want = _grads(model), {n: g for n, g in want.items() if not n.startswith("tok_embeddings")}
    _assert_grads_equal(got, want)


def test_a_different_incoming_gradient_is_refused_in_direct_mode(tiny_model_cfg):
    """Direct mode wrote the head gradients with the scale the engine promised; a backward that
    brings another one would leave them wrong, so it fails loudly (a NaN/inf passes: the trunk's
    gradient then makes the step non-finite and the trainer skips it)."""
    model, window, targets, scales = _case(tiny_model_cfg, vocab=97, batch=2)
    loss, _ = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales, sink=HeadGradSink("direct"))
    with pytest.raises(RuntimeError, match="different from the scale its head gradients were written with"):
        (loss * 2).backward()
    loss, _ = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales, sink=HeadGradSink("direct"))
    (loss * float("nan")).backward()  # passes


def test_a_later_microbatch_with_another_incoming_gradient_is_refused_in_shared_mode(tiny_model_cfg):
    model, window, targets, scales = _case(tiny_model_cfg, vocab=97, batch=2)
    sink = HeadGradSink("shared")
    losses = [mtp_loss(model, model.trunk(window[s:s + 1, :-1]), targets[:, s:s + 1], scales, sink=sink)[0]
              for s in (0, 1)]
    losses[0].backward()  # hands out both microbatches' set, times 1
    with pytest.raises(RuntimeError, match="different from the one its gradient set was handed out with"):
        (losses[1] * 3).backward()


def test_a_forward_without_its_backward_is_caught_at_the_end_of_the_step(tiny_model_cfg):
    model, window, targets, scales = _case(tiny_model_cfg, vocab=97, batch=2)
    for mode in ("direct", "shared"):
        sink = HeadGradSink(mode)
        loss, _ = mtp_loss(model, model.trunk(window[:, :-1]), targets, scales, sink=sink)
        with pytest.raises(RuntimeError, match="never ran their backward"):
            sink.check_settled()
        loss.backward()
        sink.check_settled()


def test_a_per_node_set_is_freed_by_its_backward(tiny_model_cfg):
    """Without a sink (tests, benchmarks) the node keeps its set only until its backward, even
    while the loss tensor, hence the node, stays alive."""
    model, window, targets, scales = _case(tiny_model_cfg)
    counter = LiveBytes()
    with counter:
        loss, _ = mtp_loss(model, model.trunk(window[:1, :-1]), targets[:, :1], scales)
        loss.backward()
        with_grads = counter.now
        model.zero_grad(set_to_none=True)
        assert counter.now < with_grads - 0.9 * _head_set_bytes(model)
        assert counter.now < 0.5 * _head_set_bytes(model), "the node still holds its set"
    del loss


def test_a_shared_set_of_bf16_gradients_is_summed_in_float32(tiny_model_cfg):
    """FSDP's bf16 compute copy on GPU: the step's microbatches are summed in float32 and rounded
    once, as FSDP accumulates them itself, not rounded to bf16 at every microbatch."""
    model, window, targets, scales = _case(tiny_model_cfg, vocab=97, batch=8)
    model.to(torch.bfloat16)
    sink, losses = HeadGradSink("shared"), []
    for s in range(8):
        losses.append(mtp_loss(model, model.trunk(window[s:s + 1, :-1]), targets[:, s:s + 1], scales,
                               sink=sink)[0])
    assert sink._pending[id(model.output.weight)].dtype == torch.float32
    for loss in losses:
        loss.backward()
    assert model.output.weight.grad.dtype == torch.bfloat16

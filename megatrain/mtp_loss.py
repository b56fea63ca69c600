"""Memory-efficient multi-token loss: one autograd node at the trunk output.

The paper's scheme (Gloeckle et al. 2024, Fig. 2): after the trunk forward, each head runs its
forward, its cross-entropy and its backward in turn; the gradient w.r.t. the trunk output is
accumulated and the head's logits and activations are freed before the next head starts. Peak
memory is then one head's worth, whatever n_future is.

``SequentialHeadsLoss`` does this inside ``forward``. The trunk gets its gradient through the
normal graph: the node keeps the gradient w.r.t. its input and hands it out in ``backward``
multiplied by the incoming gradient (pipeline schedules, DeepSpeed's scaling). The head
parameters' gradients go to a ``HeadGradSink`` (megatrain.head_grads): written into ``.grad`` in
the forward, or one pending set per step handed out by the first backward, so that microbatches
waiting for their backward never hold a set each.

Chained heads (causal, anticausal, and the sequential kind's depths) need the gradient of later
heads w.r.t. earlier outputs: their inputs are computed once without a graph, then heads are
replayed last-to-first, each with its own loss plus the gradient flowing back from the head after
it (one extra head forward per head). Only the d-wide hidden states of the chain are kept; each
head's logits are formed inside the fused cross-entropy and freed before the next. The sequential
depths also read token embeddings (``embedded``, (D, B, T, dim), from ``depth_token_ids``), whose
gradient the node hands back like the trunk output's.

Normalisation: head i's summed cross-entropy is multiplied by ``head_scales[i]``, which the
trainer sets to ``weight_i / (valid targets of head i in the whole global batch)``, so gradient
accumulation and data parallelism reproduce the one-big-batch mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from megatrain.head_grads import HeadGradSink
from megatrain.kernels import fused_linear_cross_entropy
from megatrain.profiling.phases import phase


def build_head_targets(window: torch.Tensor, n_future: int, ignore_index: int = -100,
                       eos_id: int | None = None, mask_cross_document: bool = False) -> torch.Tensor:
    """Targets for every head from a token window (B, T+1): returns (n_future, B, T).

    Head i (0-based) at position t predicts window[t + i + 1]; targets past the window's end are
    ``ignore_index``. With ``mask_cross_document``, a target is also ignored when an ``eos_id``
    sits strictly between the input position and the target (the target belongs to a later
    document than the token right after the input); predicting the EOS itself stays allowed.
    """
    batch, width = window.shape
    seq = width - 1
    targets = torch.full((n_future, batch, seq), ignore_index, dtype=torch.long, device=window.device)
    if mask_cross_document and eos_id is not None:
        is_eos = (window == eos_id).long()
        eos_before = torch.cumsum(is_eos, dim=1)  # eos_before[:, j] = EOS count in window[:, :j+1]
    for i in range(n_future):
        valid = seq - i  # positions t with t + i + 1 <= seq
        if valid <= 0:
            continue
        tgt = window[:, i + 1: i + 1 + valid].clone()
        if mask_cross_document and eos_id is not None and i > 0:
            # EOS count in window[t+1 .. t+i] = eos_before[t+i] - eos_before[t]
            crossing = eos_before[:, i: i + valid] - eos_before[:, :valid]
            tgt[crossing > 0] = ignore_index
        targets[i, :, :valid] = tgt
    return targets


def head_scales(valid_counts: torch.Tensor, weights) -> torch.Tensor:
    """``head_scales[i] = weight_i / valid targets of head i in the global batch`` (float32): the
    normalisation above, from each head's count of valid targets over every data-parallel rank."""
    return (torch.tensor(list(weights), dtype=torch.float64) / valid_counts.clamp(min=1).double()).float()


def depth_token_ids(next_tokens: torch.Tensor, n_depths: int) -> torch.Tensor:
    """(D, B, T): the token the sequential depth k reads at position t, x_{t+k}, from ``next_tokens``
    (B, T) = x_{t+1} (head 1's targets ``targets[0]``, which are never masked): ``next_tokens[t+k-1]``,
    0 past the window's end (those positions predict nothing and come after every one that does).
    These are the window's own tokens, not the (possibly masked) targets: a depth's attention at a
    later position reads them, as at inference."""
    out = torch.zeros((n_depths, *next_tokens.shape), dtype=torch.long, device=next_tokens.device)
    seq = next_tokens.shape[1]
    for k in range(1, n_depths + 1):
        out[k - 1, :, :seq - k + 1] = next_tokens[:, k - 1:]
    return out


@dataclass
class HeadStats:
    """Per-head statistics of one micro-batch, detached: summed CE, argmax hits, valid targets."""

    loss_sum: torch.Tensor  # (n_future,) float64
    n_correct: torch.Tensor  # (n_future,) int64
    n_valid: torch.Tensor  # (n_future,) int64


def _ce_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the heads' cross-entropy takes its hidden state and unembedding in.

    Under autocast, autocast's dtype: the RMSNorm output is float32 there, and computing in it
    would make a float32 copy of the unembedding (or of FSDP's bf16 compute copy) for every head
    and run the [N, D] x [D, V] GEMMs without tensor cores. The kernels accumulate the
    log-sum-exp and the gradients in float32 themselves. Without autocast, the hidden's dtype.
    """
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _head_ce(model, i, out, targets_i, ignore_index, impl):
    """Head i's summed CE and argmax hits; vocab-parallel when its unembedding's weight is a DTensor."""
    hidden = model.head_norm(i)(out).flatten(0, 1)  # (B*T, D), replicated over the tp group
    weight = model.unembedding(i).weight
    tp_group = None
    if isinstance(weight, DTensor):  # (V/tp, D) local shard of the vocab-parallel unembedding
        tp_group = weight.device_mesh.get_group()
        weight = weight.to_local()  # its gradient flows back into the sharded parameter's
    dtype = _ce_dtype(hidden)
    # No-ops when the dtypes already agree (FSDP's bf16 compute copy of the weight under bf16
    # autocast); otherwise a cast whose backward returns the gradient in the original dtype.
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return fused_linear_cross_entropy(hidden, weight, targets_i.flatten(), ignore_index=ignore_index,
                                      reduction="sum", impl=impl, tp_group=tp_group,
                                      return_n_correct=True)


class SequentialHeadsLoss(torch.autograd.Function):
    """forward(trunk_hidden, embedded, model, targets, head_scales, ignore_index, impl, sink,
    params, *param_inputs).

    Returns (loss, per-head summed CE, per-head argmax hits); only ``loss`` is differentiable.
    ``embedded``: the sequential depths' token embeddings (D, B, T, dim), or None for parallel
    heads. ``params``: the head parameters (a list, the sink's keys); ``param_inputs``: what their
    gradients leave the node by (``sink.node_inputs``: the parameters, views of them, or nothing).
    """

    @staticmethod
    def forward(ctx, trunk_hidden, embedded, model, targets, head_scales, ignore_index, impl, sink,
                params, *param_inputs):
        n = model.n_future
        loss_sum = torch.zeros(n, dtype=torch.float64)
        n_correct = torch.zeros(n, dtype=torch.int64)
        total = torch.zeros((), dtype=torch.float32, device=trunk_hidden.device)
        generation = sink.open()
        grad_embedded = torch.zeros_like(embedded) if embedded is not None else None

        def run_head(i, x, grad_out):
            """Head i's forward + CE + backward from input x; returns grad w.r.t. x. Chained heads:
            ``grad_out`` is the later heads' gradient w.r.t. what this head hands on."""
            nonlocal total
            x = x.detach().requires_grad_(True)
            e = model.depth_input(embedded, i)
            e = e.detach().requires_grad_(True) if e is not None else None
            head = i + 1  # phases name heads 1-based
            with torch.enable_grad():
                with phase(f"head{head}.forward", head=head):
                    out = model.head_forward(i, x, embedded=e)
                with phase(f"head{head}.loss", head=head):
                    ce_sum, hits = _head_ce(model, i, out, targets[i], ignore_index, impl)
                    scaled = ce_sum.float() * head_scales[i]
                with phase(f"head{head}.backward", head=head):
                    head_params = model.head_params(i)
                    outputs, grad_outputs = [scaled], [None]
                    if grad_out is not None:  # chained: later heads' gradient w.r.t. this output
                        outputs.append(model.chain_value(i, out))
                        grad_outputs.append(grad_out)
                    wrt = [x] + ([e] if e is not None else [])
                    grads = torch.autograd.grad(outputs, [*wrt, *head_params], grad_outputs,
                                                allow_unused=True)
                    # Drop the head's graph now: its nodes (the CE's, with its gradient buffers)
                    # live as long as a tensor refers to them, i.e. until run_head returns.
                    ce_sum, scaled = ce_sum.detach(), scaled.detach()
                    sink.add(head_params, grads[len(wrt):])
                    grad_x = grads[0]
                    if e is not None:
                        grad_embedded[i - 1].copy_(grads[1])
                    del grads, outputs, out  # summed in / done with: free them before the next head
            loss_sum[i] = ce_sum.double().cpu()
            n_correct[i] = hits.cpu()
            total = total + scaled
            return grad_x

        if not model.heads_are_chained:
            grad_trunk = None
            for i in model.head_order:
                g = run_head(i, trunk_hidden, None)
                grad_trunk = g if grad_trunk is None else grad_trunk.add_(g)
                del g  # else it stays alive (B x T x D) through the next head
        else:
            # Inputs of every head along the chain, without a graph (B, T, D each).
            order = model.head_order
            inputs = [trunk_hidden.detach()]
            with torch.no_grad():
                for i in order[:-1]:
                    out = model.head_forward(i, inputs[-1], embedded=model.depth_input(embedded, i))
                    inputs.append(model.chain_value(i, out))
            grad_out = None
            for k in reversed(range(len(order))):
                grad_out = run_head(order[k], inputs[k], grad_out)
                inputs[k] = None  # free as we go
            grad_trunk = grad_out

        ctx.save_for_backward(grad_trunk, grad_embedded)
        ctx.sink, ctx.generation, ctx.params, ctx.n_inputs = sink, generation, params, len(param_inputs)
        ctx.handed_out = False
        ctx.mark_non_differentiable(loss_sum, n_correct)
        return total, loss_sum, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_loss_sum, _grad_n_correct):
        grad_trunk, grad_embedded = ctx.saved_tensors
        grads = [None] * ctx.n_inputs
        if not ctx.handed_out and ctx.sink.hands_out_now(ctx, ctx.n_inputs):
            ctx.handed_out = True
            grads = ctx.sink.take(ctx.generation, ctx.params, grad_loss)
        if grad_embedded is not None:
            grad_embedded = grad_embedded * grad_loss.to(grad_embedded.dtype)
        return (grad_trunk * grad_loss.to(grad_trunk.dtype), grad_embedded, None, None, None, None,
                None, None, None, *grads)


def mtp_loss(model, trunk_hidden: torch.Tensor, targets: torch.Tensor, head_scales: torch.Tensor,
             ignore_index: int = -100, impl: str = "auto", sink: HeadGradSink | None = None,
             embedded: torch.Tensor | None = None) -> tuple[torch.Tensor, HeadStats]:
    """The summed multi-token loss of one micro-batch, memory-efficient when gradients are on.

    ``targets``: (n_future, B, T) from ``build_head_targets``; ``head_scales``: (n_future,) float32
    factors applied to each head's summed CE. ``sink``: where the head parameters' gradients go
    (megatrain.head_grads; the engines own one per stage, shared by a step's microbatches);
    None = this node keeps its own and hands them out in its backward. ``embedded``: the
    sequential depths' token embeddings (D, B, T, dim); by default looked up here in the model's
    own ``tok_embeddings`` (a last pipeline stage without it passes them). Returns the scaled total
    and per-head stats.
    """
    n_valid = (targets != ignore_index).flatten(1).sum(1).cpu()
    head_scales = head_scales.to(device=trunk_hidden.device, dtype=torch.float32)
    if model.layout.sequential and model.layout.n_depths and embedded is None:
        embedded = model.depth_embeddings(depth_token_ids(targets[0], model.layout.n_depths))
    if not model.layout.n_depths:
        embedded = None
    if torch.is_grad_enabled() and trunk_hidden.requires_grad:
        sink = (sink if sink is not None else HeadGradSink("per_node")).for_node()
        params = model.all_head_params()
        total, loss_sum, n_correct = SequentialHeadsLoss.apply(
            trunk_hidden, embedded, model, targets, head_scales, ignore_index, impl, sink, params,
            *sink.node_inputs(params))
    else:
        total, loss_sum, n_correct = _forward_only(model, trunk_hidden, embedded, targets, head_scales,
                                                   ignore_index, impl)
    return total, HeadStats(loss_sum, n_correct, n_valid)


def _forward_only(model, trunk_hidden, embedded, targets, head_scales, ignore_index, impl):
    n = model.n_future
    loss_sum = torch.zeros(n, dtype=torch.float64)
    n_correct = torch.zeros(n, dtype=torch.int64)
    total = torch.zeros((), dtype=torch.float32, device=trunk_hidden.device)
    x = trunk_hidden
    for i in model.head_order:
        out = model.head_forward(i, x, embedded=model.depth_input(embedded, i))
        ce_sum, hits = _head_ce(model, i, out, targets[i], ignore_index, impl)
        loss_sum[i], n_correct[i] = ce_sum.double().cpu(), hits.cpu()
        total = total + ce_sum.float() * head_scales[i]
        if model.heads_are_chained:
            x = model.chain_value(i, out)
    return total, loss_sum, n_correct


def mtp_loss_naive(model, trunk_hidden, targets, head_scales, ignore_index=-100, embedded=None):
    """Reference: every head's full logits alive at once, plain autograd. For tests, and for
    ``megatrain profile memory --compare-naive`` (its heads' backward runs in the trunk's)."""
    if model.layout.sequential and model.layout.n_depths and embedded is None:
        embedded = model.depth_embeddings(depth_token_ids(targets[0], model.layout.n_depths))
    total, x = 0.0, trunk_hidden
    for i in model.head_order:  # the loop of model.head_outputs, with each head's phases marked
        with phase(f"head{i + 1}.forward", head=i + 1):
            out = model.head_forward(i, x, embedded=model.depth_input(embedded, i))
        with phase(f"head{i + 1}.loss", head=i + 1):
            logits = model.logits(out, i).float().flatten(0, 1)
            ce = torch.nn.functional.cross_entropy(logits, targets[i].flatten(),
                                                   ignore_index=ignore_index, reduction="sum")
            total = total + ce * head_scales[i]
        if model.heads_are_chained:
            x = model.chain_value(i, out)
    return total

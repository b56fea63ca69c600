"""Where the heads' parameter gradients go: one set per step, whatever the microbatch count.

The sequential-heads node (megatrain.mtp_loss) computes every head parameter's gradient inside its
forward. Keeping that set on the node until its backward (a full set of head, norm and
unembedding gradients: ~0.94B parameters at 6.7B, n_future=4) stacks one set per microbatch
waiting for its backward: M sets on the last pipeline stage under GPipe, and one set on top of
``.grad`` under gradient accumulation. A ``HeadGradSink`` decides where they go:

* ``direct``: added straight into ``param.grad`` in the forward, already multiplied by the
  gradient the node's backward will receive (``grad_scale``: the engine knows it before the step;
  the backward checks it). Nothing beyond the ``.grad`` tensors themselves, and the head
  parameters are not inputs of the node, so its backward (and a zero-bubble schedule's separate
  weight pass) has nothing to do for them. Only where nothing watches the parameters' gradient
  accumulation: one process, tensor and pipeline parallelism.
* ``shared``: summed into one pending set shared by the step's microbatches, handed out by the
  first backward that runs (times its incoming gradient) and then released; later backwards of
  the same set check that they bring the same incoming gradient. Autograd accumulates the set into
  ``.grad``, so FSDP's and DeepSpeed's hooks see an ordinary gradient. At most one set beyond
  ``.grad``, however many microbatches are in flight.
  A zero-bubble schedule runs the node's backward twice, an input pass and a weight pass
  (torch's ``stage_backward_input`` / ``stage_backward_weight``); the set must go to the weight
  pass, as the input pass drops parameter gradients. With ``split_backward`` the node takes
  views of the parameters as inputs, whose backward nodes (unlike the parameters' own) autograd
  can say it will run in this pass (``torch._C._will_engine_execute_node``), and hands the set
  out only on the pass that reaches them.
* ``per_node``: each node keeps its own set until its backward, the old behaviour: one set per
  microbatch in flight. Only for the schedule's shape inference and when ``mtp_loss`` gets no
  sink.

Every node hands out (or checks) once: its first backward, or with ``split_backward`` the pass
that reaches the parameters. Engines call ``check_settled`` after each step.

A node whose backward never runs would leave its share in a ``shared`` set for the next step's
first backward; the only such forward in our code, the pipeline schedule's shape inference, gets
a ``per_node`` sink of its own (megatrain.parallel.pipeline).
"""

from __future__ import annotations

import torch

MODES = ("direct", "shared", "per_node")


class HeadGradSink:
    def __init__(self, mode: str, grad_scale: float = 1.0, split_backward: bool = False):
        if mode not in MODES:
            raise ValueError(f"HeadGradSink mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.split_backward = split_backward and mode == "shared"
        self.grad_scale = float(grad_scale)  # direct mode: the incoming gradient of every node
        self._pending: dict[int, torch.Tensor] = {}  # id(param) -> summed gradient
        self._generation = 0  # shared: bumped each time the pending set is handed out
        self._used_scale: dict[int, torch.Tensor] = {}  # shared: generation -> its incoming gradient
        self._outstanding = 0  # nodes whose forward ran and whose backward has not

    def node_inputs(self, params: list) -> list:
        """What the node takes as inputs for the head parameters (their gradients leave by them)."""
        if self.mode == "direct":
            return []
        return [p.view_as(p) for p in params] if self.split_backward else list(params)

    def hands_out_now(self, ctx, n_inputs: int) -> bool:
        """Whether this backward through the node is the one to hand the set out in."""
        if not self.split_backward or n_inputs == 0:
            return True
        edges = [fn for fn, _ in ctx.next_functions[-n_inputs:] if fn is not None]
        return any(torch._C._will_engine_execute_node(fn) for fn in edges)

    def for_node(self) -> HeadGradSink:
        """The sink one node writes to: this one, or a fresh one in per_node mode."""
        return HeadGradSink("per_node") if self.mode == "per_node" else self

    # ---- the node's forward ------------------------------------------------------------------
    def open(self) -> int:
        """A node starts; returns the generation its gradients join."""
        self._outstanding += 1
        return self._generation

    def add(self, params, grads) -> None:
        """Take one head's parameter gradients (of the node's scaled loss)."""
        for p, g in zip(params, grads):
            if g is None:
                continue
            if self.mode == "direct":
                if self.grad_scale != 1.0:
                    g = g.mul_(self.grad_scale)
                if p.grad is None:
                    p.grad = g  # what autograd's AccumulateGrad does with a fresh gradient
                else:
                    p.grad.add_(g)
                continue
            held = self._pending.get(id(p))
            if held is None:
                # A shared set sums several microbatches: in float32 when the parameter is bf16/fp16
                # (FSDP's compute copy on GPU), as FSDP's own accumulation across microbatches does.
                wide = self.mode == "shared" and g.dtype in (torch.bfloat16, torch.float16)
                self._pending[id(p)] = g.float() if wide else g
            else:
                held.add_(g)

    # ---- the node's backward (once per node) -------------------------------------------------
    def take(self, generation: int, params, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
        """The gradients a node of ``generation`` hands to ``params`` in its backward: none in
        direct mode (no parameter inputs), ``None`` each when an earlier backward already handed
        its shared set out."""
        self._outstanding -= 1
        if self.mode == "direct":
            _check_equal(grad_loss, self.grad_scale, "the scale its head gradients were written with")
            return []  # the parameters are not node inputs in direct mode
        used = self._used_scale.get(generation)
        if used is not None:
            _check_equal(grad_loss, used, "the one its gradient set was handed out with")
            out = [None] * len(params)
        else:
            out = [None if (g := self._pending.pop(id(p), None)) is None
                   else g.mul_(grad_loss.to(g.dtype)).to(p.dtype) for p in params]
            self._used_scale[generation] = grad_loss.detach()
            self._generation += 1
        if self.split_backward:  # the weight pass asks for every parameter: give it zeros
            out = [_zeros_for(p) if g is None else g for p, g in zip(params, out)]
        if self._outstanding == 0:
            self._used_scale.clear()
            if self._pending:
                raise RuntimeError(f"{len(self._pending)} head gradients were never handed out: "
                                   "the nodes sharing a HeadGradSink must take the same parameters")
        return out

    def check_settled(self) -> None:
        """At the end of a step: every node's backward ran and nothing waits to be handed out.
        A forward of the heads with gradients on whose backward never ran would otherwise put its
        gradients into the next step (shared) or leave them in .grad (direct)."""
        if self._outstanding or self._pending:
            raise RuntimeError(f"{self._outstanding} sequential-heads node(s) of this step never ran "
                               f"their backward ({len(self._pending)} head gradients pending): a "
                               f"forward with gradients on must be followed by its backward")


def _zeros_for(p: torch.Tensor) -> torch.Tensor:
    """A zero gradient for ``p``: one element expanded (allocates nothing; a DTensor's on its
    local shape, with its placements) where ``.grad`` exists to be added to; a real tensor where
    the weight pass would install it as ``.grad`` itself (a stride-0 ``.grad`` breaks later
    in-place updates)."""
    from torch.distributed.tensor import DTensor

    local = p.to_local() if isinstance(p, DTensor) else p
    if p.grad is None:
        zeros = torch.zeros_like(local)
    else:
        zeros = torch.zeros((), dtype=local.dtype, device=local.device).expand(local.shape)
    if isinstance(p, DTensor):
        return DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False)
    return zeros


def _check_equal(grad_loss: torch.Tensor, expected, what: str) -> None:
    """A NaN/inf incoming gradient (now or when the set was handed out) passes: it already makes
    the trunk's gradient, hence the global gradient norm, non-finite, and the trainer skips such
    a step whatever the heads hold."""
    expected = torch.as_tensor(expected, device=grad_loss.device)
    ok = (grad_loss == expected) | ~torch.isfinite(grad_loss) | ~torch.isfinite(expected)
    # torch._assert_async does not wait for a GPU (there a mismatch is a device-side assert,
    # reported at the next synchronisation); on CPU it raises at once
    torch._assert_async(ok.all(), f"the sequential-heads node got an incoming gradient different "
                                  f"from {what}")

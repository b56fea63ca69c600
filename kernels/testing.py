"""Judging a fused linear + cross-entropy against a float64 truth (tests and benchmark).

Following apple/ml-cross-entropy: an implementation's error is measured against a float64
truth computed from the *same* low-precision inputs, and judged against the error that plain
torch makes when it computes in that low precision itself (``native``). Only torch is imported.
"""

import torch
import torch.nn.functional as F

IGNORE = -100

# The (N, D, V, bias) shapes both implementations are judged on: an odd one (N, D, V multiples of
# no block size) and a realistic vocabulary. Small, because the Triton interpreter's cost grows
# with programs x loop steps.
SHAPES = {
    "odd": (37, 48, 1001, True),
    "llama_vocab": (160, 128, 32000, False),
}


def make_case(n_rows, dim, vocab, dtype, *, bias=False, seed=0, device="cpu",
              frac_ignored=0.1, frac_argmax=0.4, logit_scale=3.0):
    """Inputs with realistic logit spread (std ~ logit_scale), some ignored rows, and a share of
    targets set to the true argmax so that n_correct is neither 0 nor N."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (logit_scale / dim**0.5)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = b.to(dtype) if bias else None
    logits = hidden.double() @ weight.double().t() + (b.double() if bias else 0.0)
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    pick = torch.rand(n_rows, generator=gen)
    targets = torch.where(pick < frac_argmax, logits.argmax(-1), targets)
    targets = torch.where(pick > 1 - frac_ignored, torch.full_like(targets, IGNORE), targets)
    upstream = torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.5  # for "none"
    to = dict(device=device)
    return dict(hidden=hidden.to(**to), weight=weight.to(**to),
                bias=None if b is None else b.to(**to), targets=targets.to(**to),
                upstream=upstream.to(**to))


def shape_case(shape, dtype, **kwargs):
    """``make_case`` at one of ``SHAPES`` (``kwargs``: device, seed, ...)."""
    n_rows, dim, vocab, bias = SHAPES[shape]
    return make_case(n_rows, dim, vocab, dtype, bias=bias, **kwargs)


def _grad_out(loss, case, reduction):
    # a non-unit upstream gradient catches a backward that ignores grad_output
    if reduction == "none":
        return case["upstream"].to(loss.dtype)
    return torch.full_like(loss, 0.7)


def run(fn, case, reduction, dtype=None, **kwargs):
    """Loss, n_correct and grads of ``fn(hidden, weight, targets, bias=..., reduction=...,
    return_n_correct=True)`` on the case's inputs (cast to ``dtype`` when given)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaves = {k: cast(case[k]).detach().requires_grad_() for k in ("hidden", "weight", "bias")
              if case[k] is not None}
    loss, n_correct = fn(leaves["hidden"], leaves["weight"], case["targets"],
                         bias=leaves.get("bias"), reduction=reduction, return_n_correct=True,
                         **kwargs)
    loss.backward(_grad_out(loss, case, reduction))
    out = {"loss": loss.detach(), "n_correct": n_correct}
    out.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return out


def backward_dtypes(fn, case, reduction, **kwargs):
    """The dtypes the autograd.Function's backward itself returns, by input name. Read from
    ``grad_fn`` directly: autograd silently casts a gradient of the wrong dtype before it reaches
    ``.grad`` (after the wrong-dtype [V, D] tensor has been built), so ``.grad`` proves nothing."""
    names = [k for k in ("hidden", "weight", "bias") if case[k] is not None]
    leaves = {k: case[k].detach().requires_grad_() for k in names}
    loss = fn(leaves["hidden"], leaves["weight"], case["targets"], bias=leaves.get("bias"),
              reduction=reduction, **kwargs)
    if isinstance(loss, tuple):  # (loss, n_correct)
        loss = loss[0]
    with torch.no_grad():  # as the autograd engine runs a backward
        grads = loss.grad_fn.apply(torch.ones_like(loss), None)
    # the Function's inputs start (hidden, weight, bias): bias's slot is there even when None
    return {k: grads[i].dtype for i, k in enumerate(("hidden", "weight", "bias")) if k in names}


def _eager(hidden, weight, targets, *, bias=None, reduction="mean", return_n_correct=True):
    """Plain torch in the inputs' own precision: [N, V] logits, F.cross_entropy."""
    logits = F.linear(hidden, weight, bias)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
    valid = targets != IGNORE
    return loss, ((logits.argmax(-1) == targets) & valid).sum()


def truth(case, reduction):
    """Float64 results on the case's (low-precision) inputs."""
    return run(_eager, case, reduction, dtype=torch.float64)


def native(case, reduction):
    """Plain torch computing in the inputs' own dtype: the yardstick for low-precision error."""
    return run(_eager, case, reduction)


def errors(result, reference):
    """Max abs error per field (float fields only), in float64."""
    return {k: (result[k].double() - reference[k].double()).abs().max().item()
            for k in reference if k != "n_correct"}


def judge(result, case, reduction, *, factor=2.0, floor_rel=None):
    """Assert each field's error vs the float64 truth is at most ``factor`` x the native error
    (plus a tiny floor relative to the field's magnitude: float32 native error can be ~0)."""
    true = truth(case, reduction)
    nat = native(case, reduction)
    err, nat_err = errors(result, true), errors(nat, true)
    dtype = case["hidden"].dtype
    floor_rel = floor_rel if floor_rel is not None else {torch.float32: 1e-6}.get(dtype, 1e-3)
    for key, e in err.items():
        scale = true[key].abs().max().item()
        bound = factor * nat_err[key] + floor_rel * scale
        assert e <= bound, (f"{key}: error {e:.3g} vs float64 truth exceeds {bound:.3g} "
                            f"({factor} x native {dtype} error {nat_err[key]:.3g} + "
                            f"{floor_rel:g} x |truth| {scale:.3g})")
    return true


def run_and_judge(fn, case, reduction, **kwargs):
    """``run`` then ``judge``; also n_correct must be a 0-dim int64 equal to the truth's, and > 0
    (the case makes some targets the argmax). Returns the result."""
    result = run(fn, case, reduction, **kwargs)
    true = judge(result, case, reduction)
    n_correct, n_true = result["n_correct"], int(true["n_correct"])
    assert n_correct.dtype == torch.int64 and n_correct.dim() == 0, f"n_correct: {n_correct!r}"
    assert int(n_correct) == n_true > 0, f"n_correct {int(n_correct)} vs float64 truth {n_true}"
    return result

"""GPU check, section 2: one training step of the paper's 1.3B model, n_future 1 and 4.

``configs/paper/1.3b_n1.yaml`` and ``1.3b_n4.yaml`` on one GPU (2 x 4096 tokens, one microbatch,
bf16 autocast, AdamW, random tokens), with ``train.compile`` off and on, and with
``model.attention=xformers`` where xformers imports: median ms, MFU and peak allocated memory.
MFU = model FLOPs per step / time / the GPU's dense bf16 peak. FLOPs are
``benchmarks/mtp_memory.py``'s count: 6 x tokens x (matmul parameters of every block, heads
included, + n_future x dim x vocab for the unembedding used once per head) + PaLM's attention
term, so n_future=4 is credited with its extra unembeddings. torch's deterministic algorithms
(on in ``megatrain train`` by default) are off.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from mtp_memory import step_flops  # benchmarks/mtp_memory.py

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = {1: REPO / "configs/paper/1.3b_n1.yaml", 4: REPO / "configs/paper/1.3b_n4.yaml"}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# rough seconds per row on an H100 (model build, warm-up, timed steps; a cold per-block
# torch.compile of the 1.3B model's 24 blocks is most of a compiled row's)
ROW_SECONDS = {False: 30, True: 120}
HEADER = ["| n_future | train.compile | attention | params | ms / step | TFLOP/s | MFU | peak GiB | loss |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|"]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in DENSE_BF16_TFLOPS.items() if key in name), None)


def train_cases(smoke: bool, xformers: bool) -> list[tuple[int, bool, str]]:
    """(n_future, compile, attention) of each row."""
    cases = [(n, False, "sdpa") for n in (1, 4)]
    if xformers:
        cases += [(n, False, "xformers") for n in (1, 4)]
    if not smoke:  # a cold torch.compile of a block takes 10-20 s on CPU: not for a smoke test
        cases += [(n, True, "sdpa") for n in (1, 4)]
    return cases


def train_config(n_future: int, compile_: bool, attention: str, smoke: bool, batch: int, seq_len: int,
                 extra: list[str] = ()):
    from megatrain.config import load_config

    overrides = [f"train.compile={str(compile_).lower()}", f"model.attention={attention}",
                 f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
                 f"data.seq_len={seq_len}", "train.deterministic=false", *extra]
    if smoke:  # the embedded tiny model's shape, with a fixed vocabulary (no dataset here)
        overrides += [f"model.n_future={n_future}", "model.vocab_size=512", "train.device=cpu",
                      "train.dtype=fp32"]
        return load_config(None, overrides)
    return load_config(PAPER_CONFIGS[n_future], overrides)


def time_train_step(cfg, device: torch.device, warmup: int, steps: int) -> dict:
    """Median ms of ``steps`` optimizer steps after ``warmup`` (compilation, autotuning), peak
    allocated bytes during the timed steps, the last loss, and the model's FLOPs per step."""
    from megatrain.model.mtp import MTPTransformer
    from megatrain.mtp_loss import build_head_targets, head_scales
    from megatrain.parallel.engine import build_engine
    from megatrain.spec import resolve

    started = time.perf_counter()
    m, t = cfg.model, cfg.train
    cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if cuda else None
    spec = resolve(cfg, world_size=1, data="none")  # random tokens: no dataset, the vocabulary given
    engine, n_params = build_engine(spec, None, device, autocast_dtype)
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, m.vocab_size, (t.batch_size, cfg.data.seq_len + 1), generator=gen).to(device)
    targets = build_head_targets(window, m.n_future)
    scales = head_scales((targets != -100).flatten(1).sum(1).cpu(), [1.0] * m.n_future)
    times, loss = [], float("nan")
    for step in range(warmup + steps):
        if step == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=cuda):
            loss, _ = engine.forward_backward(window[:, :-1], targets, scales, t.micro_batch_size)
        engine.optimizer_step(loss)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    with torch.device("meta"):  # FLOPs from the full model's parameter names and shapes
        meta = MTPTransformer(m, max_seq_len=cfg.data.seq_len)
    flops = step_flops(meta, SimpleNamespace(batch=t.batch_size, seq_len=cfg.data.seq_len,
                                             layers=m.n_layers, dim=m.dim, vocab=m.vocab_size,
                                             n_future=m.n_future))
    del engine
    return dict(ms=statistics.median(times), peak=peak, loss=float(loss), flops=flops,
                params=n_params, seconds=time.perf_counter() - started)


def _xformers_importable(device: torch.device) -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a wheel built for another torch fails in many ways
        print(f"xformers not importable ({type(err).__name__}): no xformers rows", flush=True)
        return False
    return device.type == "cuda"


class TrainSection:
    """Section 2's table in ``report`` under the key "train": the eager rows run early, the compiled
    rows (minutes of compilation) after the other sections, into the same table."""

    def __init__(self, report, device: torch.device, smoke: bool, peak_tf: float | None,
                 warmup: int, steps: int):
        self.report, self.device, self.smoke, self.peak_tf = report, device, smoke, peak_tf
        self.warmup, self.steps = warmup, steps
        self.batch, self.seq_len = (2, 32) if smoke else (2, 4096)
        what = "the default tiny model (CPU smoke)" if smoke else "configs/paper/1.3b_n{1,4}.yaml"
        self.intro = (f"**2. Training step** of {what}, {self.batch} x {self.seq_len} tokens, one "
                      f"microbatch, AdamW, random tokens; median of {steps} steps after {warmup}; MFU "
                      f"against {peak_tf or '?'} TFLOP/s dense bf16, counting n_future unembeddings.")
        self.xformers = _xformers_importable(device)
        if not self.xformers:
            self.intro += " xformers: not importable here (or no CUDA), no xformers rows."
        if smoke:
            self.intro += " No torch.compile rows in the CPU smoke (a cold compile takes minutes)."
        self.lines, self.rows = list(HEADER), []

    def _publish(self) -> None:
        self.report.set("train", self.intro + "\n\n" + "\n".join(self.lines), self.rows)

    def run(self, budget, compiled: bool) -> None:
        self._publish()
        for n, compile_, attention in train_cases(self.smoke, self.xformers):
            if compile_ == compiled:
                self._row(budget, n, compile_, attention)

    def _row(self, budget, n: int, compile_: bool, attention: str) -> None:
        label = f"| {n} | {compile_} | {attention} |"
        need = 5 if self.smoke else ROW_SECONDS[compile_]
        if not budget.allows(need):
            self.lines.append(f"{label} {budget.skip_reason(need)} | | | | | |")
            self._publish()
            return
        cfg = train_config(n, compile_, attention, self.smoke, self.batch, self.seq_len)
        try:
            r = time_train_step(cfg, self.device, self.warmup, self.steps)
        except torch.cuda.OutOfMemoryError:
            self.lines.append(f"{label} | OOM | | | | |")
            self._publish()
            return
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        tflops = r["flops"] / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tflops / self.peak_tf:.1f}%" if self.peak_tf else "n/a"
        self.lines.append(f"{label} {r['params'] / 1e9:.3f}B | {r['ms']:.1f} | {tflops:.1f} | {mfu} | "
                          f"{r['peak'] / 2**30:.2f} | {r['loss']:.3f} |")
        self.rows.append(dict(n_future=n, compile=compile_, attention=attention, **r, tflops=tflops))
        print(f"{self.lines[-1]}  [{r['seconds']:.0f} s]", flush=True)
        self._publish()

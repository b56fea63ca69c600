"""GPU check, section 3: the memory planner against the GPU.

``megatrain profile memory`` of the 1.3B n_future=4 paper config (one microbatch of 2 x 4096
tokens, so the step is one forward/backward; random tokens from a throw-away dataset of the
config's vocabulary) beside ``megatrain plan`` of the same layout: predicted vs measured peak of
every phase, and the rank's peak. On the CPU the planner matches the exact live-bytes count within
10% (tests/test_planner_vs_measurement.py); on a GPU the caching allocator's ``memory_allocated``
is what is compared, and beside it what the device really holds: the allocator's reserved bytes
(fragmentation, cached blocks) and the CUDA context (cuBLAS workspaces, kernels), which the
planner covers with ``CUDA_FRAGMENTATION`` and ``CUDA_CONTEXT_BYTES``. The section prints the
allowance those measurements imply, to be folded into the planner.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from memory_plan import measured_phases, planned_phases  # benchmarks/memory_plan.py: the phase mapping

GIB = 2**30
SECTION_SECONDS = 90  # rough, on an H100: dataset, model build, two profiled steps, the plan
SEQ_LEN, BATCH = 4096, 2


def random_dataset(out: Path, vocab: int, doc_len: int, n_docs: int = 8, seed: int = 0) -> Path:
    """A prepared dataset of ``n_docs`` documents of uniformly random tokens over a word-level
    tokenizer of ``vocab`` entries: what a profile needs, with no corpus to read."""
    from megatrain.data.synth.dataset import write_dataset
    from megatrain.data_pipelines.vocab import EOS_TOKEN

    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, doc_len).tolist() for _ in range(n_docs)]
    write_dataset(out, [EOS_TOKEN] + [f"t{i}" for i in range(1, vocab)],
                  {"train": docs, "val": docs[:1]}, {"task": "random", "seed": seed})
    return out


def profile_config(smoke: bool, dataset: Path):
    from megatrain.config import load_config

    common = [f"data.path={dataset}", "train.deterministic=false", "train.eval_every=0",
              "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=0"]
    if smoke:
        return load_config(None, [*common, "model.vocab_size=512", "train.batch_size=2",
                                  "train.micro_batch_size=2", "data.seq_len=32", "train.device=cpu"])
    return load_config(Path(__file__).resolve().parent.parent / "configs/paper/1.3b_n4.yaml",
                       [*common, f"train.batch_size={BATCH}", f"train.micro_batch_size={BATCH}",
                        f"data.seq_len={SEQ_LEN}"])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def run(report, budget, device: torch.device, smoke: bool, out_dir: Path | None) -> None:
    """Section 3 into ``report`` under the key "memory"."""
    from megatrain.planning.memory_model import CUDA_CONTEXT_BYTES, CUDA_FRAGMENTATION
    from megatrain.planning.plan import make_plan
    from megatrain.profiling.memory import profile_memory

    title = ("**3. Memory planner vs the device**: `megatrain profile memory` of "
             + ("the tiny default (CPU smoke)" if smoke else
                f"configs/paper/1.3b_n4.yaml, one microbatch of {BATCH} x {SEQ_LEN} tokens")
             + " beside `megatrain plan` of the same layout.")
    need = 10 if smoke else SECTION_SECONDS
    if not budget.allows(need):
        report.set("memory", f"{title} {budget.skip_reason(need)}")
        return
    work = Path(tempfile.mkdtemp(prefix="gpu_check_memory_"))
    try:
        vocab, doc_len = (512, 256) if smoke else (32000, 4 * SEQ_LEN)
        cfg = profile_config(smoke, random_dataset(work / "data", vocab, doc_len))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # the profile counts from what is allocated when it starts; the device holds that too
        origin = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        profile = profile_memory(cfg, steps=1, out_dir=work / "profile")
        if out_dir is not None:
            shutil.copy(work / "profile" / "memory_profile.json", out_dir / "memory_profile.json")
        total = torch.cuda.mem_get_info()[1] if device.type == "cuda" else 80 * 10**9
        plan = make_plan(cfg, total / 1e9, world_size=1)
        measured, predicted = measured_phases(profile), planned_phases(plan.ranks[0])
        lines = ["| phase | planned GiB | measured GiB | measured / planned |", "|---|---:|---:|---:|"]
        for name, got in measured.items():
            want = predicted.get(name)
            ratio = f"{got / want:.3f}" if want else ""
            lines.append(f"| {name} | {_gib(want) if want else ''} | {_gib(got)} | {ratio} |")
        rank_peak, planned_peak = profile["ranks"][0]["peak_bytes"], plan.ranks[0].peak_bytes
        lines.append(f"| **rank peak** | {_gib(planned_peak)} | {_gib(rank_peak)} | "
                     f"{rank_peak / planned_peak:.3f} |")
        results = {"planned_phases": predicted, "measured_phases": measured,
                   "planned_peak_bytes": planned_peak, "measured_peak_bytes": rank_peak,
                   "planned_with_allowance_bytes": plan.needed[0]}
        text = f"{title}\n\n" + "\n".join(lines)
        if device.type == "cuda":
            text += "\n\n" + _device_allowance(origin + rank_peak, plan.needed[0], results,
                                               CUDA_FRAGMENTATION, CUDA_CONTEXT_BYTES)
        report.set("memory", text, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _device_allowance(allocated_peak: int, planned_need: int, results: dict, fragmentation: float,
                      context: int) -> str:
    """What the device holds beyond the allocated peak, right after the profile (the caching
    allocator keeps its blocks reserved until emptied, so ``memory_reserved`` is still near its
    high-water mark), against the planner's allowance."""
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    used = total - free
    measured_context = used - reserved
    measured_fragmentation = reserved / allocated_peak - 1
    results.update(device_total_bytes=total, device_used_bytes=used, reserved_bytes=reserved,
                   context_bytes=measured_context, fragmentation=measured_fragmentation)
    return (f"Device level, read just after the profile: {_gib(used)} GiB in use of {_gib(total)} "
            f"(allocator reserved {_gib(reserved)} GiB = allocated peak x {1 + measured_fragmentation:.3f}; "
            f"outside the allocator {_gib(measured_context)} GiB). The planner allows x"
            f"{1 + fragmentation:.2f} and {_gib(context)} GiB: it asks for {_gib(planned_need)} GiB where "
            f"the device used {_gib(used)} GiB ({used / planned_need:.3f} of it). To fold in: "
            f"`CUDA_FRAGMENTATION = {max(measured_fragmentation, 0):.3f}`, `CUDA_CONTEXT_BYTES = "
            f"{max(measured_context, 0)}` (megatrain/planning/memory_model.py).")

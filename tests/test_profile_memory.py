"""`megatrain profile memory`: the CPU counter is exact, the sequential heads' memory is flat per
head and equal to n_future=1's, the naive loss grows by one logits tensor per head, the CLI writes
its files, and a 2-rank pipeline run reports every rank with its stages and microbatches."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from megatrain.cli import main
from megatrain.config import load_config
from megatrain.profiling.cpu_counter import CpuAllocationCounter
from megatrain.profiling.memory import profile_memory
from megatrain.profiling.phases import phase, phase_context, recording
from tests.test_trainer import REPO

# A model whose memory is dominated by its logits, as at scale: vocabulary 16384 >> dim 16, so one
# head's logits (256 tokens x 16384 x 4 bytes = 16 MiB) dwarf a trunk layer's activations and the
# unembedding's gradient (16384 x 16 x 4 bytes = 1 MiB).
LOGITS_HEAVY = {"model.n_layers": 6, "model.dim": 16, "model.n_heads": 2, "model.multiple_of": 16,
                "model.vocab_size": 16384, "data.seq_len": 32, "train.batch_size": 8,
                "logging.progress": False}
LOGITS_BYTES = 8 * 32 * 16384 * 4
HEAD_PHASES = ["head{}.forward", "head{}.loss", "head{}.backward"]


def _overrides(dataset, **extra):
    settings = {"data.path": str(dataset), **LOGITS_HEAVY, "logging.tensorboard": False, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


# ---- the counter ---------------------------------------------------------------------------------
def _known_pattern(extra_bytes=0):
    """Steps 0 (warm-up) and 1 of: 1000 bytes held over the step; inside head1.forward 4096 and
    8192 bytes allocated (then ``extra_bytes``, freed at once), the 4096 freed; inside
    optimizer.step 2048 allocated and the 8192 freed."""
    counter = CpuAllocationCounter()
    counter.start()
    with recording(counter):
        for step in range(2):
            with counter.step(step):
                held = torch.empty(1000, dtype=torch.uint8)
                with phase_context(stage=0, microbatch=3), phase("head1.forward", head=1):
                    a = torch.empty(4096, dtype=torch.uint8)
                    b = torch.empty(8192, dtype=torch.uint8)
                    if extra_bytes:
                        torch.empty(extra_bytes, dtype=torch.uint8)  # freed at once
                    del a
                with phase("optimizer.step"):
                    c = torch.empty(2048, dtype=torch.uint8)
                    del b
                del held, c
    counter.stop()
    return counter.result([1])


def _assert_known_pattern(result):
    got = [(p["name"], p["head"], p["stage"], p["microbatch"], p["step"], p["start_bytes"], p["peak_bytes"],
            p["end_bytes"]) for p in result["phases"]]
    want = [("head1.forward", 1, 0, 3, 1, 1000, 1000 + 4096 + 8192, 1000 + 8192),
            ("optimizer.step", None, None, None, 1, 1000 + 8192, 1000 + 8192 + 2048, 1000 + 2048)]
    assert got == want, f"measured {got}, arithmetic says {want}"
    assert result["peak_bytes"] == 1000 + 4096 + 8192, result["peak_bytes"]


def test_cpu_counter_equals_the_arithmetic_of_a_known_allocation_pattern():
    _assert_known_pattern(_known_pattern())


def test_counter_comparison_catches_a_512_byte_difference():
    """Negative control: one more 512-byte tensor inside the phase, and the check fails."""
    result = _known_pattern(extra_bytes=512)
    assert result["phases"][0]["peak_bytes"] == 1000 + 4096 + 8192 + 512
    with pytest.raises(AssertionError, match="arithmetic says"):
        _assert_known_pattern(result)


class _FakeCudaAllocator:
    """The caching allocator's statistics, driven by hand: what CudaAllocatorCounter reads."""

    def __init__(self, monkeypatch, tmp_path):
        self.allocated, self.peak, self.snapshots = 0, 0, []
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", self.snapshots.append)
        monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", lambda fn: None, raising=False)

    def _reset(self, device=None):
        self.peak = self.allocated

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n):
        self.allocated -= n


def test_cuda_counter_bookkeeping_equals_the_arithmetic(monkeypatch, tmp_path):
    """The GPU path, with the allocator's statistics faked (no GPU here): the same pattern and the
    same expected numbers as the CPU counter, and a snapshot written at the end."""
    from megatrain.profiling.cuda_counter import CudaAllocatorCounter

    fake = _FakeCudaAllocator(monkeypatch, tmp_path)
    fake.alloc(777)  # before the counter starts: not counted
    counter = CudaAllocatorCounter(torch.device("cuda", 0), tmp_path / "rank0_snapshot.pickle")
    counter.start()
    with recording(counter):
        for step in range(2):
            with counter.step(step):
                fake.alloc(1000)
                with phase_context(stage=0, microbatch=3), phase("head1.forward", head=1):
                    fake.alloc(4096)
                    fake.alloc(8192)
                    fake.free(4096)
                with phase("optimizer.step"):
                    fake.alloc(2048)
                    fake.free(8192)
                fake.free(1000 + 2048)
    counter.stop()
    result = counter.result([1])
    _assert_known_pattern(result)
    assert fake.snapshots == [str(tmp_path / "rank0_snapshot.pickle")]


def test_phases_are_free_without_a_recorder():
    assert phase("trunk.forward") is phase("head1.loss", head=1) is phase_context(stage=0)


# ---- the CLI and the per-head figures of a real step ------------------------------------------------
# every test reading the n_future=4 profile pays for it (~14 s) when it runs alone
SHARES_A_14_S_PROFILE = pytest.mark.slow


@pytest.fixture(scope="module")
def n4_profile(dataset, tmp_path_factory):
    """`megatrain profile memory --compare-naive` on n_future=4, run in this process."""
    out = tmp_path_factory.mktemp("profile_n4")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["profile", "memory", "--out", str(out), "--steps", "1", "--compare-naive",
                     *_overrides(dataset, **{"model.n_future": 4, "logging.tensorboard": True})])
    assert code == 0
    return json.loads((out / "memory_profile.json").read_text()), stdout.getvalue(), out


@pytest.fixture(scope="module")
def n1_profile(dataset, tmp_path_factory):
    cfg = load_config(None, _overrides(dataset, **{"model.n_future": 1}))
    with contextlib.redirect_stdout(io.StringIO()):
        return profile_memory(cfg, steps=1, out_dir=tmp_path_factory.mktemp("profile_n1"))


@SHARES_A_14_S_PROFILE
def test_cli_writes_the_json_the_timeline_and_prints_the_table(n4_profile):
    profile, stdout, out = n4_profile
    assert (out / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "memory_timeline_naive.png").is_file()
    assert "peak above baseline" in stdout and "naive all-logits" in stdout, stdout
    assert [line.split()[0] for line in stdout.splitlines() if line[:4].strip().isdigit()] == \
        ["1", "2", "3", "4"] * 2, stdout  # one row per head, sequential and naive
    (rank,) = profile["ranks"]
    names = [p["name"] for p in rank["phases"]]
    want = ["trunk.forward", *[n.format(i) for i in range(1, 5) for n in HEAD_PHASES], "trunk.backward",
            "optimizer.step"]
    assert names == want, names
    assert {(p["step"], p["microbatch"]) for p in rank["phases"] if p["name"] != "optimizer.step"} == {(1, 0)}
    assert rank["peak_bytes"] == max(p["peak_bytes"] for p in rank["phases"]), "a peak between phases?"
    assert profile["naive_logits_bytes_per_head"] == LOGITS_BYTES


@SHARES_A_14_S_PROFILE
def test_tensorboard_gets_each_phase_peak(n4_profile):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    profile, _, out = n4_profile
    events = EventAccumulator(str(out / "run" / "tensorboard"))
    events.Reload()
    (scalar,) = events.Scalars("memory/rank0/head2.loss/peak_bytes")
    (head2_loss,) = [p for p in profile["ranks"][0]["phases"] if p["name"] == "head2.loss"]
    assert (scalar.step, scalar.value) == (1, float(head2_loss["peak_bytes"]))
    naive = EventAccumulator(str(out / "run_naive" / "tensorboard"))
    naive.Reload()
    assert "memory_naive/rank0/head2.loss/peak_bytes" in naive.Tags()["scalars"]


def _head_peaks(profile):
    return [row["peak_above_baseline_bytes"] for row in profile["ranks"][0]["heads"]["heads"]]


def _assert_flat(peaks, rel=0.10):
    assert max(peaks) <= (1 + rel) * min(peaks), f"per-head peaks {peaks} differ by more than {rel:.0%}"


@SHARES_A_14_S_PROFILE
def test_sequential_heads_have_the_same_peak_within_10_percent(n4_profile):
    profile = n4_profile[0]
    _assert_flat(_head_peaks(profile))
    with pytest.raises(AssertionError, match="differ by more"):  # negative control: the naive loss
        _assert_flat(_head_peaks(profile["naive"]))


def _assert_step_peaks_close(a, b, rel=0.05):
    assert abs(a - b) <= rel * b, f"step peaks {a} and {b} differ by more than {rel:.0%}"


@SHARES_A_14_S_PROFILE
def test_step_peak_of_four_heads_is_within_5_percent_of_one_head(n4_profile, n1_profile):
    """Parameter-matched: n_future=4 has 2 trunk layers + 4 heads, n_future=1 5 + 1."""
    n4, n1 = n4_profile[0], n1_profile
    _assert_step_peaks_close(n4["ranks"][0]["peak_bytes"], n1["ranks"][0]["peak_bytes"])
    with pytest.raises(AssertionError, match="differ by more"):  # negative control: the naive loss
        _assert_step_peaks_close(n4["naive"]["ranks"][0]["peak_bytes"], n1["ranks"][0]["peak_bytes"])


@SHARES_A_14_S_PROFILE
def test_naive_loss_grows_by_about_one_logits_tensor_per_head(n4_profile):
    profile = n4_profile[0]
    naive = _head_peaks(profile["naive"])
    growth = [b - a for a, b in zip(naive, naive[1:])]
    for g in growth:
        assert 0.95 * LOGITS_BYTES <= g <= 1.15 * LOGITS_BYTES, (growth, LOGITS_BYTES)
    sequential = _head_peaks(profile)
    assert sequential[-1] - sequential[0] < 0.1 * LOGITS_BYTES, sequential
    assert profile["naive"]["ranks"][0]["peak_bytes"] > profile["ranks"][0]["peak_bytes"] + 3 * LOGITS_BYTES


def test_gradient_accumulation_micro_steps_are_labelled(dataset, tmp_path):
    cfg = load_config(None, _overrides(dataset, **{"model.n_future": 2, "train.micro_batch_size": 4}))
    with contextlib.redirect_stdout(io.StringIO()):
        profile = profile_memory(cfg, steps=1, out_dir=tmp_path)
    phases = profile["ranks"][0]["phases"]
    per_micro_step = ["trunk.forward", *[n.format(i) for i in (1, 2) for n in HEAD_PHASES], "trunk.backward"]
    assert [(p["name"], p["microbatch"]) for p in phases] == \
        [(name, m) for m in (0, 1) for name in per_micro_step] + [("optimizer.step", None)]
    assert profile["model"]["tokens_per_microbatch"] == 4 * 32


def test_a_folder_the_profiler_did_not_make_is_left_alone(dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(["profile", "memory", "--out", str(tmp_path), *_overrides(dataset)])
    assert code == 2 and "pass another --out" in stderr.getvalue(), stderr.getvalue()
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


# ---- two ranks -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_two_pipeline_ranks_each_report_their_stage_and_microbatches(dataset, tmp_path):
    args = ["profile", "memory", "--out", str(tmp_path), "--steps", "1",
            *_overrides(dataset, **{"model.n_future": 4, "parallel.pp": 2, "parallel.pp_schedule": "1f1b",
                                    "train.micro_batch_size": 4})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node=2", "-m", "megatrain", *args],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    profile = json.loads((tmp_path / "memory_profile.json").read_text())
    first, last = profile["ranks"]
    assert (first["rank"], last["rank"]) == (0, 1)
    seen = lambda entry: {(p["name"], p["stage"], p["microbatch"])  # noqa: E731
                          for p in entry["phases"] if p["name"] != "optimizer.step"}
    trunk = lambda stage: {(name, stage, m)  # noqa: E731
                           for name in ("trunk.forward", "trunk.backward") for m in (0, 1)}
    assert seen(first) == trunk(0)
    heads = {(n.format(i), 1, m) for i in range(1, 5) for n in HEAD_PHASES for m in (0, 1)}
    assert seen(last) == heads | trunk(1)
    assert first["heads"] is None and len(last["heads"]["heads"]) == 4
    assert last["peak_bytes"] > first["peak_bytes"], "the heads' stage should be the heavier"
    assert "rank 1 (stage 1)" in result.stdout, result.stdout


def test_sequential_depths_have_their_own_phases_and_a_flat_peak(dataset, tmp_path):
    """The sequential kind: each depth's phases (head{k}.forward/loss/backward) as for parallel
    heads, every depth at about the same height, and D = 3 depths at the step peak of D = 1 (the
    issue's bound: 1.05). Negative control: the naive all-logits loss of D = 3 grows past it."""
    profiles = {}
    for depths in (1, 3):
        cfg = load_config(None, _overrides(dataset, **{"model.mtp_kind": "sequential", "model.n_layers": 2,
                                                        "model.n_future": depths + 1}))
        with contextlib.redirect_stdout(io.StringIO()):
            profiles[depths] = profile_memory(cfg, steps=1, out_dir=tmp_path / f"d{depths}",
                                              compare_naive=depths == 3)
    (rank,) = profiles[3]["ranks"]
    names = [p["name"] for p in rank["phases"]]
    # a chain replays last to first (the later depths' gradient flows into the earlier ones)
    assert names == ["trunk.forward", *[n.format(i) for i in (4, 3, 2, 1) for n in HEAD_PHASES],
                     "trunk.backward", "optimizer.step"], names
    _assert_flat(_head_peaks(profiles[3])[1:])  # the depths (head 1 has no layer of its own)
    peak = {d: p["ranks"][0]["peak_bytes"] for d, p in profiles.items()}
    assert peak[3] <= 1.05 * peak[1], peak
    assert profiles[3]["naive"]["ranks"][0]["peak_bytes"] > 1.05 * peak[1]

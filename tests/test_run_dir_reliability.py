"""A run directory nothing can corrupt: each way it was lost or wedged, reproduced and shown fixed.

1. two trainings in one run.dir; 2. a fresh start in a used run.dir; 3. a full disk and partial
files; 4. a loss blow-up rewound with checkpoint.load_step and a lower lr; 5. damaged checkpoints;
7. raw tracebacks (run.dir a file, SIGINT during a run). Point 6 (token ids) is tested with the
data loader, the config keys of point 7 with the config.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import DiskFullError
from megatrain.errors import CheckpointError, ConfigError, NonFiniteLossError
from megatrain.process_identity import ProcessIdentity
from megatrain.run_lock import LOCK_NAME, RunDirInUse, RunLock
from tests.test_trainer import REPO, _metrics, _overrides, _train


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def _latest(run):
    return (run / "checkpoints" / "latest").read_text().strip()


def _checkpoint_model(folder: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent.parent / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)["model_optim"]["model"]


def _stop_after_step_3(overrides):
    from megatrain.config import load_config
    from megatrain.trainer import train

    assert train(load_config(None, overrides), should_stop=lambda step: step == 3).stopped_early


def _losses(run):
    return {r["step"]: (r["loss"], r["head_losses"]) for r in _metrics(run)}


# ---- 1. one writer per run dir (and 7: SIGINT) ------------------------------------------------------
def _start(args):
    return subprocess.Popen([sys.executable, "-m", "megatrain", "train", *args], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run, n, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{run} did not log {n} steps in {timeout} s")


@pytest.mark.slow
def test_a_second_training_is_refused_and_sigint_stops_the_first_cleanly(dataset, tmp_path):
    """Two starts in one run.dir: the second is refused at once, naming the first, and writes
    nothing; Ctrl-C then stops the first at a step boundary with a checkpoint, exit 130."""
    run = tmp_path / "run"
    args = _overrides(dataset, run, **{"train.steps": 100000, "checkpoint.every": 100000})
    first = _start(args)
    try:
        _wait_for_steps(run, 3)
        second = subprocess.run([sys.executable, "-m", "megatrain", "train", *args], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                text=True, timeout=300)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is in use by another training" in second.stderr and f"process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 130, err[-2000:]
    assert "interrupted after step" in err and "Traceback" not in err
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, steps[-1] + 1)) and 3 <= steps[-1] < 100000  # nothing lost
    assert _latest(run) == f"step_{steps[-1]:07d}"
    assert not (run / LOCK_NAME).exists()  # released at the end


def _dead_process_here() -> dict:
    """The lock record of a process of this host, boot and PID namespace that has ended."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    return {**ProcessIdentity.of_this_process().as_record(), "pid": int(dead), "pid_start": None}


def test_a_lock_whose_owner_is_gone_is_taken_over(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"owner": "x", **_dead_process_here(),
                                             "heartbeat": time.time(), "started": time.time()}))
    _train(_overrides(dataset, run, **{"train.steps": 2}))
    assert "its owner is gone" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()


def test_a_lock_of_a_live_process_or_a_fresh_heartbeat_elsewhere_is_respected(tmp_path, monkeypatch):
    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(RunDirInUse, match=f"process {os.getpid()}"):
            RunLock(tmp_path).acquire()
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "host": "another-node", "pid": 1}))
        with pytest.raises(RunDirInUse, match="another-node"):  # its heartbeat is fresh
            RunLock(tmp_path).acquire()
        # a requeued SLURM job's next run takes over from its previous run on another node
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "host": "another-node", "pid": 1,
                                                      "job_id": "77", "restart": 0}))
        RunLock(tmp_path).acquire()
    finally:
        holder.release()


def test_a_lock_of_a_slurm_job_that_squeue_no_longer_knows_is_taken_over(tmp_path, monkeypatch):
    """Proof from SLURM itself: a stand-in squeue answers for job 41 the way SLURM does for a job
    that has left the queue, and for job 42 that it is still running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text('#!/bin/sh\ncase "$*" in *41*) echo "slurm_load_jobs error: Invalid '
                                    'job id specified" >&2; exit 1;; *) echo RUNNING;; esac\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    record = {"owner": "x", "host": "another-node", "pid": 1, "heartbeat": time.time(),
              "started": time.time()}
    (run / LOCK_NAME).write_text(json.dumps({**record, "job_id": "42"}))
    with pytest.raises(RunDirInUse, match="SLURM job 42"):
        RunLock(run).acquire()
    (run / LOCK_NAME).write_text(json.dumps({**record, "job_id": "41"}))
    lock = RunLock(run)
    lock.acquire()
    lock.release()


def test_two_starts_taking_over_the_same_dead_lock_leave_one_owner(tmp_path, monkeypatch):
    """Both judged the same dead owner; the later one replaced the earlier one's fresh lock
    while it paused to check: the earlier one sees that and stops."""
    import megatrain.run_lock as run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"owner": "dead", "host": "another-node", "pid": 1,
                                             "heartbeat": 0.0, "started": 0.0}))
    os.utime(run / LOCK_NAME, (0, 0))  # nobody has touched it since: its heartbeat is stale
    rival = {"owner": "rival", "host": "another-node", "pid": 2, "heartbeat": time.time(),
             "started": time.time()}
    monkeypatch.setattr(run_lock.time, "sleep", lambda s: (run / LOCK_NAME).write_text(json.dumps(rival)))
    with pytest.raises(RunDirInUse, match="taken over by another start at the same moment"):
        RunLock(run).acquire()
    assert json.loads((run / LOCK_NAME).read_text())["owner"] == "rival"


def test_a_run_whose_lock_was_taken_over_stops_before_writing_a_checkpoint(dataset, tmp_path, monkeypatch):
    """Presumed gone (e.g. suspended for longer than the stale age) and taken over: the heartbeat
    notices, and the next save stops the run instead of writing into the other's run dir."""
    import megatrain.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    run = tmp_path / "run"
    other = {"owner": "new-owner", "host": "another-node", "pid": 2, "heartbeat": time.time(),
             "started": time.time()}

    def taken_over_after_step_2(step):
        if step == 2:
            (run / LOCK_NAME).write_text(json.dumps(other))
            time.sleep(0.5)  # a heartbeat passes
        return False

    from megatrain.config import load_config
    from megatrain.trainer import train

    with pytest.raises(RunDirInUse, match="took over"):
        train(load_config(None, _overrides(dataset, run, **{"train.steps": 6, "checkpoint.every": 3})),
              should_stop=taken_over_after_step_2)
    assert not (run / "checkpoints" / "step_0000003").exists()
    assert json.loads((run / LOCK_NAME).read_text())["owner"] == "new-owner"  # left alone


def test_a_heartbeat_never_puts_its_record_back_over_a_new_owner(tmp_path, monkeypatch):
    """The race CI hit once: the heartbeat read our record, another start took the lock over, and
    the heartbeat's write restored ours. Here the takeover lands between every read and the next
    step of the heartbeat."""
    import megatrain.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.01)
    other = {"owner": "new-owner", "host": "another-node", "pid": 2, "heartbeat": time.time(),
             "started": time.time()}
    lock = RunLock(tmp_path)
    read = RunLock._read

    def read_then_taken_over(self):
        holder = read(self)
        (tmp_path / LOCK_NAME).write_text(json.dumps(other))
        return holder

    lock.acquire()
    monkeypatch.setattr(RunLock, "_read", read_then_taken_over)
    time.sleep(0.2)
    monkeypatch.setattr(RunLock, "_read", read)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["owner"] == "new-owner"
    assert lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["owner"] == "new-owner"  # left alone


# ---- 2. fresh starts never destroy ------------------------------------------------------------------
def test_a_fresh_start_in_a_used_run_dir_is_refused_or_archives_never_deletes(dataset, tmp_path):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 6, "checkpoint.every": 3}))
    old_metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="run.overwrite=archive"):
        _train(_overrides(dataset, run, **{"train.steps": 6, "checkpoint.resume": False}))
    assert (run / "metrics.jsonl").read_text() == old_metrics and _steps(run) == ["step_0000003",
                                                                                 "step_0000006"]
    assert not (run / LOCK_NAME).exists()  # a refused start leaves no lock behind
    _train(_overrides(dataset, run, **{"train.steps": 4, "checkpoint.every": 2,
                                       "checkpoint.resume": False, "run.overwrite": "archive"}))
    (archived,) = (run / "archive").iterdir()
    assert (archived / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == [
        "latest", "step_0000003", "step_0000006"]
    assert _steps(run) == ["step_0000002", "step_0000004"] and _latest(run) == "step_0000004"
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]


def test_pruning_keeps_the_checkpoint_just_written_and_the_one_latest_names(tmp_path):
    from megatrain.checkpoint import CheckpointManager
    from megatrain.parallel.model_state import ModelAndOptimizer

    model = torch.nn.Linear(2, 2)
    state = {"mo": ModelAndOptimizer(model, torch.optim.AdamW(model.parameters()))}
    manager = CheckpointManager(tmp_path, keep=1)
    manager.prepare()
    (tmp_path / "checkpoints" / "step_0000100").mkdir()  # a stray folder with a higher step
    manager.save(state, step=1)
    assert "step_0000001" in _steps(tmp_path) and _latest(tmp_path) == "step_0000001"


# ---- 3. full disks and partial files ----------------------------------------------------------------
def test_a_torn_metrics_line_and_a_stale_tmp_checkpoint_do_not_stop_a_resume(dataset, tmp_path):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 4, "checkpoint.every": 2}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1, "head_los')  # the disk filled up mid-line
    (run / "checkpoints" / "step_0000005.tmp").mkdir()
    _train(_overrides(dataset, run, **{"train.steps": 6, "checkpoint.every": 2}))
    assert [r["step"] for r in _metrics(run)] == list(range(1, 7))
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_bytes)`` mounts a tmpfs of that size and returns its path."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / "disk"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_disk_is_reported_and_the_previous_checkpoint_stays_intact(dataset, tmp_path, small_disk):
    settings = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3}
    probe = tmp_path / "probe"
    _train(_overrides(dataset, probe, **{**settings, "train.steps": 2}))
    one = sum(p.stat().st_size for p in (probe / "checkpoints" / "step_0000002").iterdir())
    run = small_disk(int(one * 1.5) + (256 << 10)) / "run"  # room for one checkpoint, not two
    with pytest.raises(DiskFullError, match=f"disk full at {run / 'checkpoints'}") as caught:
        _train(_overrides(dataset, run, **settings))
    message = str(caught.value)
    # sizes in a unit that reads: a checkpoint of a few hundred KB is not "0.00 GB"
    assert re.search(r"[\d.]+ [KM]B free, and this write needs about [\d.]+ [KM]B", message), message
    assert "previous checkpoint is intact" in message
    assert _latest(run) == "step_0000002" and _steps(run) == ["step_0000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert not (run / LOCK_NAME).exists()
    moved = tmp_path / "moved"  # "free space": the same run dir on a disk with room
    shutil.copytree(run, moved)
    _train(_overrides(dataset, moved, **settings))
    assert [r["step"] for r in _metrics(moved)] == list(range(1, 7)) and _latest(moved) == "step_0000006"


# ---- 4. a loss blow-up is rewound ------------------------------------------------------------------
def test_a_blow_up_is_rewound_with_load_step_and_a_lower_lr(dataset, tmp_path):
    run = tmp_path / "run"
    good = _overrides(dataset, run, **{"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 5})
    _train(good)
    blowup = _overrides(dataset, run, **{"train.steps": 30, "checkpoint.every": 2, "checkpoint.keep": 5,
                                         "train.lr": 1e6})
    with pytest.raises(NonFiniteLossError) as caught:
        _train(blowup)
    message = str(caught.value)
    assert "checkpoint.load_step=2" in message and "train.lr=100000" in message, message
    saved = [int(name[5:]) for name in _steps(run)]
    for step in saved:  # nothing non-finite was ever saved
        for name, tensor in _checkpoint_model(run / "checkpoints" / f"step_{step:07d}").items():
            assert torch.isfinite(tensor).all(), (step, name)
    rewind = _overrides(dataset, run, **{"train.steps": 8, "checkpoint.every": 2, "checkpoint.keep": 5,
                                         "train.lr": 1e-3, "checkpoint.load_step": 4})
    _train(rewind)
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records[4:])
    assert records[4]["lr"] <= 1e-3  # the new lr applies from the rewound step on
    later = [p for p in (run / "archive").glob("rewind-*/checkpoints/step_*")]
    assert sorted(p.name for p in later) == [f"step_{s:07d}" for s in saved if s > 4]
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and history[-1]["changes"]["train.lr"] == [1e6, 1e-3]


def test_a_resume_with_a_new_lr_uses_it_and_an_unchanged_resume_is_exact(dataset, tmp_path):
    """Optimizer keys may change on resume (train.lr here) and apply from that step; with the
    same config the resumed steps equal an uninterrupted run's to the bit."""
    straight, resumed, changed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "changed"
    settings = {"train.steps": 6, "checkpoint.every": 3, "train.warmup_steps": 0}
    _train(_overrides(dataset, straight, **settings))
    _stop_after_step_3(_overrides(dataset, resumed, **settings))
    _train(_overrides(dataset, resumed, **settings))
    assert _losses(resumed) == _losses(straight)
    _stop_after_step_3(_overrides(dataset, changed, **settings))
    _train(_overrides(dataset, changed, **{**settings, "train.lr": 5e-3}))
    lrs = [r["lr"] for r in _metrics(changed)]
    straight_lrs = [r["lr"] for r in _metrics(straight)]
    assert lrs[:3] == straight_lrs[:3]
    assert all(abs(a / b - 0.5) < 1e-9 for a, b in zip(lrs[3:], straight_lrs[3:])), (lrs, straight_lrs)


# ---- 5. damaged checkpoints -------------------------------------------------------------------------
def _flip_byte_in_tensor_data(folder: Path) -> None:
    data = folder / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file", "garbage metadata"])
def test_a_damaged_checkpoint_is_reported_and_the_newest_intact_one_resumes_exactly(
        damage, dataset, tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    settings = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 3}
    _train(_overrides(dataset, straight, **settings))
    _train(_overrides(dataset, run, **{**settings, "train.steps": 4}))
    newest = run / "checkpoints" / "step_0000004"
    if damage == "flipped byte":
        _flip_byte_in_tensor_data(newest)
    elif damage == "truncated file":
        data = newest / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[:-100])
    else:
        (newest / ".metadata").write_bytes(os.urandom(300))
    capsys.readouterr()
    _train(_overrides(dataset, run, **settings))
    out = capsys.readouterr().out
    assert "step_0000004 is not usable" in out and "resumed from" in out and "step_0000002" in out
    assert _losses(run) == _losses(straight)  # exact resume from step 2
    assert list((run / "archive").glob("damaged-*/checkpoints/step_0000004"))


def test_no_intact_checkpoint_is_a_clear_error_and_config_yaml_is_kept(dataset, tmp_path):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 2, "checkpoint.every": 2}))
    before = (run / "config.yaml").read_text()
    _flip_byte_in_tensor_data(run / "checkpoints" / "step_0000002")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step_0000002.*checksum"):
        _train(_overrides(dataset, run, **{"train.steps": 4, "train.lr": 5e-3}))
    assert (run / "config.yaml").read_text() == before  # written only after a successful load


# ---- 7. clear errors instead of tracebacks ------------------------------------------------------------
def test_a_run_dir_that_is_a_file_is_a_config_error(dataset, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        _train(_overrides(dataset, target))


# ---- second round (issue 23): the cases a hostile pass still broke ------------------------------------


def _crash_at(step: int):
    """A ``should_stop`` that dies like a kill -9 / double Ctrl-C right after ``step`` (no checkpoint)."""
    def should_stop(current):
        if current == step:
            raise KeyboardInterrupt
        return False
    return should_stop


def test_a_run_that_stopped_before_its_first_checkpoint_restarts_from_step_0(dataset, tmp_path, capsys):
    """Point 5: config.yaml, metrics, no checkpoint: the same command restarts it (it used to say
    "holds an earlier run ... resume it (checkpoint.resume=true)" although resume was true)."""
    from megatrain.config import load_config
    from megatrain.trainer import train

    run = tmp_path / "run"
    args = _overrides(dataset, run, **{"train.steps": 5, "checkpoint.every": 100, "train.eval_every": 0})
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), should_stop=_crash_at(3))
    crashed = _losses(run)
    assert sorted(crashed) == [1, 2, 3] and not _steps(run)
    capsys.readouterr()
    _train(args)  # the same command
    assert "restarting" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]  # each step once
    assert {s: _losses(run)[s] for s in crashed} == crashed  # step 0 again: the same steps


def test_a_rewind_archives_the_metrics_after_its_step_beside_the_checkpoints(dataset, tmp_path):
    """Point 4: load_step=2 after 6 steps keeps the old steps 3-6's records (the evidence of a
    blow-up) in the archive with the checkpoints it moved, instead of overwriting them."""
    run = tmp_path / "run"
    settings = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 5, "train.eval_every": 0}
    _train(_overrides(dataset, run, **settings))
    old = {json.loads(line)["step"]: line for line in (run / "metrics.jsonl").read_text().splitlines()}
    _train(_overrides(dataset, run, **{**settings, "checkpoint.load_step": 2, "train.lr": 1e-3}))
    (archived,) = (run / "archive").glob("rewind-*")
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    kept = (archived / "metrics.jsonl").read_text().splitlines()
    assert kept == [old[s] for s in (3, 4, 5, 6)], kept  # moved whole, byte for byte
    new = {r["step"]: r for r in _metrics(run)}
    assert sorted(new) == list(range(1, 7)) and new[3]["lr"] != json.loads(old[3])["lr"]


def test_a_resume_that_finds_metrics_missing_says_so(dataset, tmp_path, capsys):
    """Point 1: another writer (or a cut file) left steps without records before the checkpoint a
    run resumes: the resume says which; an intact file (control) gives no such warning."""
    run = tmp_path / "run"
    settings = {"train.steps": 6, "checkpoint.every": 6, "train.eval_every": 0}
    _train(_overrides(dataset, run, **settings))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    _train(_overrides(dataset, run, **{**settings, "train.steps": 7}))  # control: nothing missing
    assert "no training records" not in capsys.readouterr().out
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:3]))  # steps 4-6 lost
    (run / "checkpoints" / "step_0000007").rename(tmp_path / "later")  # resume step 6 again
    _train(_overrides(dataset, run, **{**settings, "train.steps": 7}))
    assert "has no training records for steps 4-6 of the 6 this run resumes" in capsys.readouterr().out


def test_a_step_folder_replaced_by_a_file_is_reported_not_skipped(dataset, tmp_path, capsys):
    """Point 7: it used to be skipped silently, and the save of that step crashed later with
    NotADirectoryError."""
    run = tmp_path / "run"
    settings = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 3, "train.eval_every": 0}
    _train(_overrides(dataset, run, **settings))
    newest = run / "checkpoints" / "step_0000004"
    shutil.rmtree(newest)
    newest.write_text("not a checkpoint")
    capsys.readouterr()
    _train(_overrides(dataset, run, **{**settings, "train.steps": 6}))
    out = capsys.readouterr().out
    assert "step_0000004 is not usable (it is a file, not a checkpoint folder)" in out, out
    assert "resumed from" in out and "step_0000002" in out
    assert _steps(run) == ["step_0000002", "step_0000004", "step_0000006"] and newest.is_dir()
    assert [p.is_file() for p in (run / "archive").glob("damaged-*/checkpoints/step_0000004")] == [True]


@pytest.mark.parametrize("damage", ["wrong types", "metrics.jsonl a folder"])
def test_a_metrics_file_of_the_wrong_shape_is_an_error_or_dropped_lines(dataset, tmp_path, capsys, damage):
    """Point 8: no traceback: lines that are not records are dropped and counted; a folder where
    metrics.jsonl belongs is an error naming it, before anything is written."""
    run = tmp_path / "run"
    settings = {"train.steps": 2, "checkpoint.every": 2, "train.eval_every": 0}
    _train(_overrides(dataset, run, **settings))
    if damage == "wrong types":
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": "abc"}\n[1, 2]\n{"step": null, "loss": 1}\n{"step": -3}\n')
        capsys.readouterr()
        _train(_overrides(dataset, run, **{**settings, "train.steps": 3}))
        assert "dropped 4 damaged line(s)" in capsys.readouterr().out
        assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    else:
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
        with pytest.raises(ConfigError, match=r"metrics.jsonl is not a file, and megatrain keeps its "
                                              r"metrics file there; move it out"):
            _train(_overrides(dataset, run, **{**settings, "train.steps": 3}))
        assert not (run / LOCK_NAME).exists() and _steps(run) == ["step_0000002"]


def test_a_damaged_tokenizer_fails_the_start_not_the_end_of_the_run(dataset, tmp_path):
    """Point 9: a garbage tokenizer.json used to train every step, then crash in the end-of-run
    sample; it is now checked with the shards, at the start."""
    from megatrain.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "tokenizer.json").write_bytes(bytes(range(256)) * 4)
    run = tmp_path / "run"
    with pytest.raises(DataError, match=f"tokenizer {data / 'tokenizer.json'} of the dataset .* cannot be "
                                        f"loaded \\(stream did not contain valid UTF-8\\)"):
        _train(_overrides(data, run, **{"train.steps": 2}))
    assert not (run / "metrics.jsonl").exists() and not (run / LOCK_NAME).exists()
    # another tokenizer in its place (valid, but not the one the shards were made with)
    from megatrain.data.synth.dataset import write_tokenizer

    write_tokenizer(["<|endoftext|>", "a", "b"], data / "tokenizer.json")
    with pytest.raises(DataError, match="does not match .*manifest.json: it has ids 0..2, the manifest "
                                        "records vocab_size 257"):
        _train(_overrides(data, run, **{"train.steps": 2}))


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``disk`` until ``leave_bytes`` are free (in pages)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * (64 << 10)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave_bytes))
    return filler


def _assert_nothing_torn(run: Path) -> None:
    """Every metrics line a record, config.yaml whole, no lock and no half-written file left."""
    import yaml

    if (run / "metrics.jsonl").exists():
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps), steps
    if (run / "config.yaml").exists():
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert not (run / LOCK_NAME).exists()
    assert not [p for p in run.rglob("*.tmp")], list(run.rglob("*"))


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("when", ["between checkpoints", "at the start"])
def test_a_full_disk_anywhere_is_one_clear_error_and_leaves_nothing_torn(dataset, tmp_path, small_disk,
                                                                         capfd, when):
    """Point 6: a full disk outside a checkpoint save (here the metrics line of a step, or
    config.yaml at a start with 4 KB free) used to print a raw traceback, exit 1 and leave a stale
    lock and a torn line; it is the one "disk full at PATH" error, and the same command goes on
    once there is space."""
    from megatrain.config import load_config
    from megatrain.errors import DiskFullError
    from megatrain.trainer import train

    disk = small_disk(8 << 20)
    run = disk / "run"
    # no checkpoint before the end: what fills up first is the metrics file
    args = _overrides(dataset, run, **{"train.steps": 30, "checkpoint.every": 0, "train.eval_every": 0,
                                       "logging.tensorboard": True})

    def fill_after_step_3(step):
        if step == 3:
            _fill(disk, 0)
        return False

    if when == "at the start":
        _fill(disk, 4096)
    with pytest.raises(DiskFullError) as caught:
        train(load_config(None, args), should_stop=fill_after_step_3 if when != "at the start" else None)
    err, message = capfd.readouterr().err, str(caught.value)
    # between checkpoints: a metrics line or TensorBoard's events, whichever needs a new page first
    written = "(metrics.jsonl|tensorboard)" if when != "at the start" else "config.yaml"
    assert re.match(f"disk full at {re.escape(str(run))}/{written}: 0 KB free", message), message
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    _assert_nothing_torn(run)
    (disk / "filler").unlink()  # free space: the same command goes on
    _train(args)
    assert [r["step"] for r in _metrics(run)] == list(range(1, 31))


# a thread's exception that reaches the hook (a traceback outside pytest) fails the test
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_under_tensorboard_is_the_same_error_without_a_thread_traceback(tmp_path, small_disk,
                                                                                     capfd):
    """Point 6: TensorBoard writes from its own thread, which printed a traceback of its own and
    then failed every later call; its full disk is reported like any other."""
    from megatrain.errors import DiskFullError
    from megatrain.metrics import MetricsLogger
    from megatrain.run_dir import RunDir

    disk = small_disk(4 << 20)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.tensorboard_dir.symlink_to(disk, target_is_directory=True)  # only TensorBoard's disk is full
    logger = MetricsLogger(run, tensorboard=True, progress=False, total_steps=500, start_step=0)
    _fill(disk, 0)
    record = {"loss": 1.0, "head_losses": [1.0, 2.0], "head_accuracy": [0.5, 0.5], "lr": 1e-3,
              "grad_norm": 1.0, "tokens_per_s": 1.0, "peak_mem_bytes": 1}
    with pytest.raises(DiskFullError, match=f"disk full at {run.tensorboard_dir}: 0 KB free"):
        for step in range(1, 501):  # TensorBoard's thread writes 8 KB at a time
            logger.log_train({"step": step, **record})
        logger.close()
    logger.close(quietly=True)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    steps = [r["step"] for r in _metrics(run.path)]
    assert steps == list(range(1, len(steps) + 1)) and steps, steps  # metrics.jsonl whole

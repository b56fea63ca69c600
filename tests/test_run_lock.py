"""The run dir's lock across PID namespaces, boots and torn lock files (issue 23, points 1 and 10).

A pid names a process only in its PID namespace: a training in a container that shares the host
name must not be judged gone because its pid does not exist here. An empty lock file is judged by
its age, and said to be what it is.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatrain.process_identity import ProcessIdentity, boot_time
from megatrain.run_lock import HEARTBEAT_S, LOCK_NAME, STALE_S, TORN_GRACE_S, RunDirInUse, RunLock
from tests.test_run_dir_reliability import _wait_for_steps
from tests.test_trainer import REPO, _overrides


def _write_lock(run, record: dict, age_s: float = 0.0) -> None:
    """A lock file holding ``record``, last touched ``age_s`` ago (its heartbeat)."""
    run.mkdir(exist_ok=True)
    touched = time.time() - age_s
    (run / LOCK_NAME).write_text(json.dumps({"owner": "other", "started": touched, "heartbeat": touched,
                                             **record}))
    os.utime(run / LOCK_NAME, (touched, touched))


@pytest.fixture(autouse=True)
def _no_takeover_pause(monkeypatch):
    """The pause after a takeover only matters to two starts racing; none race here."""
    import megatrain.run_lock as run_lock

    monkeypatch.setattr(run_lock, "TAKEOVER_SETTLE_S", 0.0)


def _take(run) -> None:
    lock = RunLock(run)
    lock.acquire()
    lock.release()


# ---- point 1: PID namespaces and boots -------------------------------------------------------------
def test_an_owner_in_another_pid_namespace_counts_as_running_until_its_heartbeat_is_stale(tmp_path, capsys):
    """Pid 1 certainly exists here, but in another PID namespace it is another process: its
    liveness cannot be checked from here, so only a stale heartbeat proves it gone."""
    run = tmp_path / "run"
    other_ns = {**ProcessIdentity.of_this_process().as_record(), "pid": 1, "pid_start": 1,
                "pid_ns": "pid:[4026599999]"}
    _write_lock(run, other_ns, age_s=2 * HEARTBEAT_S)
    with pytest.raises(RunDirInUse) as caught:
        _take(run)
    assert "another PID namespace" in str(caught.value) and f"{STALE_S:.0f} s old" in str(caught.value)
    # control: the same record with a stale heartbeat is taken over
    _write_lock(run, other_ns, age_s=STALE_S + 60)
    _take(run)
    assert "heartbeat is" in capsys.readouterr().out


def test_a_lock_of_an_older_megatrain_without_identity_is_not_judged_by_its_pid(tmp_path):
    """{host, pid} alone may name a process of another container: unknown, so held while fresh."""
    run = tmp_path / "run"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    _write_lock(run, {"host": ProcessIdentity.of_this_process().host, "pid": dead})
    with pytest.raises(RunDirInUse, match="without its boot id and PID namespace"):
        _take(run)


def test_a_reused_pid_in_the_same_namespace_is_gone(tmp_path, capsys):
    """Our own pid exists, but was started at another time than the lock records: another process."""
    run = tmp_path / "run"
    me = ProcessIdentity.of_this_process()
    if me.start is None:
        pytest.skip("no /proc/PID/stat here: process start times are unknown")
    _write_lock(run, {**me.as_record(), "pid_start": me.start - 1})
    _take(run)
    assert "now names a process started at another time" in capsys.readouterr().out
    _write_lock(run, me.as_record())  # control: the same record with the right start time is alive
    with pytest.raises(RunDirInUse, match=f"process {me.pid} on {me.host} is running"):
        _take(run)


def test_a_host_restarted_since_the_last_heartbeat_has_no_live_owner(tmp_path, capsys):
    """Same host name, another boot id: the owner's kernel is gone if this one booted after the
    lock's last heartbeat; with a heartbeat after this boot it may be another machine: held."""
    booted, me = boot_time(), ProcessIdentity.of_this_process()
    if booted is None or me.boot_id is None or time.time() - booted < 2 * HEARTBEAT_S + 10:
        pytest.skip("needs /proc boot time and boot id, and an uptime above two heartbeats")
    run = tmp_path / "run"
    before_boot = {**me.as_record(), "boot_id": "0" * 8, "pid": 4242}
    _write_lock(run, before_boot, age_s=time.time() - booted + 5)
    _take(run)
    assert "has restarted since the owner's last heartbeat" in capsys.readouterr().out
    _write_lock(run, before_boot, age_s=1)  # control: touched after this boot
    with pytest.raises(RunDirInUse, match="another boot of this host name"):
        _take(run)


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True)
    return None if probe.returncode == 0 else f"unshare --pid is not allowed here: {probe.stderr.strip()}"


def test_a_training_in_another_pid_namespace_keeps_the_run_dir(dataset, tmp_path):
    """A training started with `unshare --pid --fork --mount-proc` (a container sharing the host
    name) owns the run dir; a start outside that namespace is refused, naming why, and takes
    nothing over (before the fix it said "its process N on HOST no longer exists" and both wrote)."""
    reason = _unshare_works()
    if reason:
        pytest.skip(reason)
    run = tmp_path / "run"
    args = _overrides(dataset, run, **{"train.steps": 100000, "checkpoint.every": 100000,
                                       "model.n_layers": 3, "train.eval_every": 0})
    first = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "megatrain",
                              "train", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_steps(run, 1)
        inside = json.loads((run / LOCK_NAME).read_text())
        with pytest.raises(RunDirInUse) as caught:  # this process: the host's PID namespace
            _take(run)
        still_running = first.poll() is None
        after = json.loads((run / LOCK_NAME).read_text())
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    here = ProcessIdentity.of_this_process()
    assert inside["pid_ns"] != here.pid_ns and inside["host"] == here.host, (inside, here)
    assert "another PID namespace" in str(caught.value), str(caught.value)
    assert still_running and after == inside  # the owner was never disturbed, its lock left alone


# ---- point 10: a torn lock file -----------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", '{"owner": "abc", "ho'])
def test_a_torn_lock_file_is_said_to_be_one_and_taken_over_once_old_enough(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(content)  # a start killed between creating and writing it
    with pytest.raises(RunDirInUse) as caught:  # just written: perhaps a start writing it right now
        _take(run)
    message = str(caught.value)
    assert "lock file" in message and f"{TORN_GRACE_S:.0f} s" in message, message
    assert "1970" not in message and "process -1" not in message, message
    old = time.time() - TORN_GRACE_S - 5
    os.utime(run / LOCK_NAME, (old, old))
    _take(run)
    out = capsys.readouterr().out
    kind = "empty" if not content else "unreadable"
    assert f"the lock file is {kind}" in out, out
    assert not (run / LOCK_NAME).exists()

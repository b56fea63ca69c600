"""``megatrain submit`` / ``status`` against the real local SLURM cluster (tests/slurm_fixtures.py).

The requeue tests run ``TrainJob`` around ``stand_in_train``: a few lines with the trainer's
contract (resume from checkpoints/latest; on ``should_stop()`` save at the step boundary and
return early) whose steps are a sleep, so the SLURM side is exercised exactly and cheaply. The
tests marked ``needs_trainer`` run the real trainer end to end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatrain.config import load_config
from megatrain.errors import ConfigError

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

from megatrain.cli import main as megatrain_cli  # noqa: E402
from megatrain.slurm import registry  # noqa: E402
from megatrain.slurm.resources import Resources, read_partitions  # noqa: E402
from megatrain.slurm.status import collect, format_status  # noqa: E402
from megatrain.slurm.submit import submit  # noqa: E402
from tests.slurm_fixtures import wait_done  # noqa: E402
from tests.test_trainer import _overrides  # noqa: E402
from tests.test_trainer_parallel import _launch  # noqa: E402

# stand_in_train travels to the job by value: the job's interpreter cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 120
STAND_IN_STEP_S = 0.05

needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("megatrain.data_pipelines.prepare") is None
    or importlib.util.find_spec("megatrain.data.loader") is None,
    reason="the trainer's data pipeline (megatrain.data_pipelines.prepare, megatrain.data) has not landed")


def stand_in_train(cfg, should_stop=None):
    """The trainer's contract in miniature: resume from ``checkpoints/latest``, one metrics record
    per step, a checkpoint every ``checkpoint.every`` steps, at the end, and when asked to stop."""
    run_dir = Path(cfg.run.dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    pointer = checkpoints / "latest"
    step = int(pointer.read_text().strip().split("_")[1]) if pointer.is_file() else 0
    if step:
        print(f"resumed from {checkpoints / pointer.read_text().strip()} at step {step}", flush=True)
    metrics = run_dir / "metrics.jsonl"
    kept = [x for x in (metrics.read_text().splitlines() if metrics.is_file() else [])
            if json.loads(x)["step"] <= step]
    metrics.write_text("".join(x + "\n" for x in kept))

    def save(at):
        (checkpoints / f"step_{at:07d}").mkdir(exist_ok=True)
        (checkpoints / "latest.tmp").write_text(f"step_{at:07d}\n")
        os.replace(checkpoints / "latest.tmp", pointer)

    with open(metrics, "a") as out:
        while step < cfg.train.steps:
            time.sleep(STAND_IN_STEP_S)
            step += 1
            out.write(json.dumps({"step": step, "loss": 1.0 / step, "pid": os.getpid()}) + "\n")
            out.flush()
            stop = should_stop is not None and should_stop()
            if stop or step == cfg.train.steps or step % cfg.checkpoint.every == 0:
                save(step)
            if stop:
                break
    return SimpleNamespace(run_dir=run_dir, step=step, head_losses=[1.0 / max(step, 1)],
                           stopped_early=step < cfg.train.steps)


def _cfg(run_dir, **overrides):
    base = {"run.dir": str(run_dir), "train.steps": 200, "checkpoint.every": 50,
            "logging.progress": False, "logging.tensorboard": False}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _wait_for(predicate, what, timeout=JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _steps(run_dir):
    return [json.loads(x)["step"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _events(run_dir, job_id):
    (record,) = [j for j in registry.read_jobs(run_dir) if j["job_id"] == job_id]
    return [(e["event"], e.get("restart"), e.get("step")) for e in record["events"]]


def _queue(cluster):
    return set(cluster.run("squeue", "-h", "-o", "%i").split())


@contextlib.contextmanager
def _queued_stand_in(cluster, run_dir):
    """A stand-in training job submitted into ``run_dir`` for the ``with`` body, then cancelled."""
    result = submit(_cfg(run_dir), Resources(time_min=10), train_fn=stand_in_train)
    try:
        yield result
    finally:
        cluster.run("scancel", str(result.job_id))
        cluster.wait_job(result.job_id, timeout=JOB_TIMEOUT_S)


# ------------------------------------------------------------------------------------------------
# What submit reads from the cluster and hands to submitit

def test_partitions_and_nodes_read_from_sinfo_match_what_scontrol_shows(slurm_cluster):
    """read_partitions relies on sinfo's output format: checked here against the real cluster."""
    partitions = read_partitions()
    assert sorted(partitions) == sorted([slurm_cluster.partition, slurm_cluster.second_partition])
    assert [p.name for p in partitions.values() if p.default] == [slurm_cluster.partition]
    shown = {}
    for line in slurm_cluster.run("scontrol", "show", "node", "-o").splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        shown[fields["NodeName"]] = (int(fields["CPUTot"]), int(fields["RealMemory"]), 0)
    assert len(shown) == slurm_cluster.nodes, shown
    for part in partitions.values():
        assert (part.state, part.max_nodes, part.max_time_min) == ("UP", None, None), part
        assert {n.name: (n.cpus, n.mem_mb, n.gpus) for n in part.nodes} == shown, part
        # scontrol's spelling of a node state; which one depends on the jobs running now
        assert all(n.state.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED") for n in part.nodes), part


def test_the_sbatch_script_shown_is_the_one_submitit_submits(slurm_cluster, tmp_path):
    """submit.sbatch_text renders the script through submitit's private methods (there is no public
    one): if an upgrade changes what submitit submits, --dry-run would show another script."""
    with _queued_stand_in(slurm_cluster, tmp_path / "run") as result:
        submitted = Path(result.job.paths.submission_file).read_text()
        assert "#SBATCH --time=10" in submitted and "-m submitit.core._submit" in submitted, submitted
        assert result.sbatch_script == submitted


# ------------------------------------------------------------------------------------------------
# Refused at submit time, nothing queued

def test_bad_requests_are_refused_before_anything_is_queued(slurm_cluster, tmp_path, capsys):
    queued_before = _queue(slurm_cluster)
    run_dir = tmp_path / "run"
    cases = [
        (["--partition", "nope"], "--partition=nope: no such partition"),
        (["--nodes", "3"], "--nodes=3: partition debug has only 2 node(s)"),
        (["--partition", slurm_cluster.second_partition, "--cpus-per-task", "8"],
         "--tasks-per-node/--cpus-per-task"),
        (["--gpus-per-node", "1"], "--gpus-per-node: the job needs 1 GPU(s)"),
        (["--mem-gb", "4096"], "--mem-gb"),
        (["--nodes", "2"], "--nodes=2 x 1 task(s) per node = 2 process(es): parallel.dp * parallel.tp"),
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--time", "1", "--signal-delay-s", "60"], "--signal-delay-s=60 must be shorter than --time=1"),
    ]
    for flags, message in cases:
        code = megatrain_cli(["submit", *flags, f"run.dir={run_dir}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, code, err)
        assert "Traceback" not in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"run.dir={blocker}/run cannot be created"):
        submit(_cfg(blocker / "run"), Resources(time_min=5))
    assert not _queue(slurm_cluster) - queued_before, "a refused request was queued"
    assert not run_dir.exists()


def test_a_second_job_into_a_run_dir_with_an_active_job_is_refused(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    with _queued_stand_in(slurm_cluster, run_dir) as first:
        queued = _queue(slurm_cluster)
        with pytest.raises(ConfigError, match=f"already has job {first.job_id}"):
            submit(_cfg(run_dir), Resources(time_min=10), train_fn=stand_in_train)
        assert _queue(slurm_cluster) == queued, "the refused job was queued"


def test_dry_run_prints_request_and_sbatch_script_and_submits_nothing(slurm_cluster, tmp_path, capsys):
    queued_before = _queue(slurm_cluster)
    run_dir = tmp_path / "run"
    code = megatrain_cli(["submit", "--dry-run", "--partition", slurm_cluster.second_partition,
                          "--cpus-per-task", "2", "--time", "30", "--max-requeues", "5",
                          f"run.dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 node(s) x [1 task(s), 2 CPU(s) per task" in out
    for line in ("#SBATCH --partition=cpu", "#SBATCH --cpus-per-task=2", "#SBATCH --time=30",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", f"{run_dir}/slurm_logs/%j/%j_0_log.err",
                 "srun --unbuffered", "-m submitit.core._submit"):
        assert line in out, line
    assert not run_dir.exists()
    assert not _queue(slurm_cluster) - queued_before, "a dry run was queued"


# ------------------------------------------------------------------------------------------------
# Preemption and time limits with the stand-in trainer

def test_preempted_job_checkpoints_requeues_and_resumes_without_losing_a_step(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    result = submit(_cfg(run_dir), Resources(time_min=10), train_fn=stand_in_train,
                    command=["test"])
    job = result.job
    assert (run_dir / "config.yaml").is_file()
    snapshot = Path(registry.read_jobs(run_dir)[0]["code_snapshot"])
    assert (snapshot / "megatrain" / "slurm" / "job.py").is_file()
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file(), "the first checkpoint")
    job._interrupt()  # preemption: SIGTERM, then the checkpoint signal
    wait_done(job, JOB_TIMEOUT_S)

    assert job.result()["restarts"] == 1
    events = _events(run_dir, job.job_id)
    assert [e[:2] for e in events] == [("started", 0), ("requeued", 0), ("started", 1),
                                      ("completed", 1)], events
    snapshot = registry.read_jobs(run_dir)[0]["code_snapshot"]
    assert registry.read_jobs(run_dir)[0]["events"][0]["code"] == f"{snapshot}/megatrain"
    stopped_at = events[1][2]
    assert stopped_at % 50, f"stopped at step {stopped_at}: a periodic checkpoint, not the stop's own"
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:07d} at step {stopped_at}" in job.stdout()
    # no step lost, none run twice: run 1 wrote 1..k, run 2 k+1..200
    assert _steps(run_dir) == list(range(1, 201))
    assert slurm_cluster.wait_job(job.job_id)["State"] == "COMPLETED"
    runs = [r[0].split()[0] for r in slurm_cluster.sacct(job.job_id, duplicates=True)]
    assert runs == ["REQUEUED", "COMPLETED"], runs

    status = collect(run_dir)
    assert (status.step, status.total_steps, status.latest_checkpoint) == (200, 200, "step_0000200")
    (js,) = status.jobs
    assert (js.state, js.restarts, js.command) == ("COMPLETED", 1, ["test"])
    text = format_status(status)
    assert f"job {job.job_id}  COMPLETED  exit 0:0  2 run(s), 1 restart(s)" in text, text
    assert str(result.stdout) in text


def test_time_limit_requeues_resumes_and_stops_cleanly_when_the_budget_is_spent(slurm_cluster, tmp_path):
    """--time 1 with one requeue allowed: run 1 gets the time-limit signal, checkpoints and
    requeues; run 2 resumes from that step, gets the signal again and fails with a clear report."""
    run_dir = tmp_path / "run"
    result = submit(_cfg(run_dir, **{"train.steps": 100000, "checkpoint.every": 100000}),
                    Resources(time_min=1, signal_delay_s=50, max_requeues=1), train_fn=stand_in_train)
    job = result.job
    wait_done(job, timeout=240)
    assert slurm_cluster.wait_job(job.job_id)["State"] == "FAILED"

    events = _events(run_dir, job.job_id)
    assert [e[:2] for e in events] == [("started", 0), ("requeued", 0), ("started", 1), ("failed", 1)], events
    first_stop, second_stop = events[1][2], events[3][2]
    assert 0 < first_stop < second_stop < 100000, events
    assert f"at step {first_stop}" in job.stdout()
    assert _steps(run_dir) == list(range(1, second_stop + 1))
    record = registry.read_jobs(run_dir)[0]
    assert record["events"][1]["reason"] == "time limit", record["events"][1]

    status = collect(run_dir)
    (js,) = status.jobs
    assert (js.state, js.exit_code, js.restarts) == ("FAILED", "1:0", 1), js
    assert "requeue budget spent (1 of --max-requeues=1)" in js.error
    text = format_status(status)
    assert f"log: {result.stderr}" in text and "error: RequeueBudgetExhausted" not in text
    assert f"checkpoint of step {second_stop}" in text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{second_stop:07d}"


# ------------------------------------------------------------------------------------------------
# The real trainer

@needs_trainer
def test_failing_job_is_reported_with_exit_code_error_and_log_path(slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = megatrain_cli(["submit", "--time", "5", f"run.dir={run_dir}", f"data.path={tmp_path}/no_data",
                          "logging.progress=false"])
    assert code == 0, capsys.readouterr().err
    job_id = registry.read_jobs(run_dir)[0]["job_id"]
    assert slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S)["State"] == "FAILED"
    assert megatrain_cli(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}  FAILED  exit 1:0" in out, out
    assert "error: DataError:" in out and "no_data" in out, out
    assert f"log: {run_dir}/slurm_logs/{job_id}/{job_id}_0_log.err" in out, out


COMPARED = ("step", "loss", "head_losses", "head_accuracy", "lr", "grad_norm")


def _train_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, lines) if "loss" in r]


def _train_here(overrides):
    from megatrain.trainer import train

    return train(load_config(None, overrides))


@needs_trainer
def test_one_task_job_trains_exactly_like_a_local_run(slurm_cluster, dataset, tmp_path, capsys):
    job_dir, local_dir = tmp_path / "job", tmp_path / "local"
    assert megatrain_cli(["submit", "--time", "5", "--partition", slurm_cluster.second_partition,
                          *_overrides(dataset, job_dir)]) == 0
    out = capsys.readouterr().out
    job_id = registry.read_jobs(job_dir)[0]["job_id"]
    assert f"submitted job {job_id}" in out
    _train_here(_overrides(dataset, local_dir))  # meanwhile, the same run in this process
    record = slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S)
    assert (record["State"], record["Partition"]) == ("COMPLETED", "cpu"), record
    assert _train_records(job_dir) == _train_records(local_dir)
    assert [r["step"] for r in _train_records(job_dir)] == list(range(1, 9))
    assert (job_dir / "checkpoints" / "latest").read_text().strip() == "step_0000008"


@needs_trainer
# One rank (nodes=1, reference: a local run) is left out of the suite for time (~35 s): its
# requeue path is the stand-in test's above, its exact-resume path this two-node case's.
@pytest.mark.parametrize("nodes", [2], ids=["two_nodes_dp2"])
def test_preempted_training_resumes_and_ends_with_the_uninterrupted_losses(slurm_cluster, dataset, tmp_path,
                                                                           monkeypatch, nodes):
    """Two ranks (one per emulated node, dp=2): every rank stops after the same step, rank 0
    requeues; the reference is an uninterrupted 2-rank job. (nodes=1: a local run.)"""
    monkeypatch.setenv("MEGATRAIN_MASTER_ADDR", "127.0.0.1")  # emulated nodes do not resolve
    job_dir, reference_dir = tmp_path / "job", tmp_path / "reference"
    steps = 300 if nodes == 1 else 100  # a 2-rank step costs ~5x more on the 2 shared cores
    extra = {"train.steps": steps, "checkpoint.every": 20, "train.eval_every": 50, "parallel.dp": nodes}
    res = Resources(nodes=nodes, time_min=10)
    result = submit(load_config(None, _overrides(dataset, job_dir, **extra)), res)
    reference = None
    if nodes > 1:
        reference = submit(load_config(None, _overrides(dataset, reference_dir, **extra)), res)
    _wait_for(lambda: (job_dir / "checkpoints" / "latest").is_file(), "the first checkpoint")
    result.job._interrupt()
    if reference is None:
        _train_here(_overrides(dataset, reference_dir, **extra))
    else:
        wait_done(reference.job, JOB_TIMEOUT_S)
    wait_done(result.job, JOB_TIMEOUT_S)

    events = _events(job_dir, result.job.job_id)
    assert [e[:2] for e in events] == [("started", 0), ("requeued", 0), ("started", 1),
                                      ("completed", 1)], (events, result.job.stdout()[-3000:])
    stopped_at = events[1][2]
    assert 20 <= stopped_at < steps, events
    resumed = f"resumed from {job_dir}/checkpoints/step_{stopped_at:07d} at step {stopped_at}"
    assert resumed in result.job.stdout()
    job_records, reference_records = _train_records(job_dir), _train_records(reference_dir)
    assert [r["step"] for r in job_records] == list(range(1, steps + 1))
    assert job_records == reference_records, next(
        (a, b) for a, b in zip(job_records, reference_records) if a != b)


@pytest.mark.parametrize("nodes, tasks_per_node", [(1, 2), (2, 1)], ids=["one_node", "two_nodes"])
def test_two_rank_job_matches_a_local_run(slurm_cluster, dataset, tmp_path, monkeypatch, nodes,
                                         tasks_per_node):
    monkeypatch.setenv("MEGATRAIN_MASTER_ADDR", "127.0.0.1")  # emulated nodes do not resolve
    job_dir, local_dir = tmp_path / "job", tmp_path / "local"
    overrides = _overrides(dataset, job_dir, **{"parallel.dp": 2})
    result = submit(load_config(None, overrides),
                    Resources(nodes=nodes, tasks_per_node=tasks_per_node, time_min=5))
    # the same config started by torchrun on this machine, and as one process
    torchrun = _launch(2, _overrides(dataset, local_dir / "torchrun", **{"parallel.dp": 2}))
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    _train_here(_overrides(dataset, local_dir / "single"))
    record = slurm_cluster.wait_job(result.job_id, timeout=JOB_TIMEOUT_S)
    assert record["State"] == "COMPLETED", record
    if nodes == 2:
        assert record["NodeList"] == "node[1-2]", record
    job_records = _train_records(job_dir)
    assert [r["step"] for r in job_records] == list(range(1, 9))
    for reference, rel in (("torchrun", 1e-6), ("single", 1e-5)):
        for a, b in zip(job_records, _train_records(local_dir / reference)):
            assert a["loss"] == pytest.approx(b["loss"], rel=rel), (reference, a, b)
            assert a["head_losses"] == pytest.approx(b["head_losses"], rel=rel), (reference, a, b)

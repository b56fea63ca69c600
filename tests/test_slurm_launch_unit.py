"""The SLURM launcher's parts that need no cluster: reading sinfo output, fitting a request to a
partition, the process layout, jobs.json, the stop-signal flags, the status report, and the
sbatch script rendered for the paper's 6.7B / 13B requests on a (described) GPU cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from megatrain.config import load_config
from megatrain.errors import ConfigError
from megatrain.slurm import registry
from megatrain.slurm.resources import (
    NodeInfo,
    PartitionInfo,
    Resources,
    SlurmRequestError,
    check_fits,
    gpu_count,
    parse_minutes,
    partitions_from_sinfo,
    read_partitions,
)

REPO = Path(__file__).resolve().parents[1]

# What read_partitions' two sinfo calls print (the format as Slurm 22.05 prints it on the local
# cluster), for a cluster with a GPU partition, a CPU partition sharing no node with it, and an
# empty one. A partition's row repeats once per group of alike nodes.
SINFO_PARTITIONS = ("gpu|gpu*|up|2-00:00:00|1-infinite|\n"
                    "gpu|gpu*|up|2-00:00:00|1-infinite|\n"
                    "cpu|cpu|up|infinite|1|\n"
                    "spare|spare|down|30:00|2-4|\n")
SINFO_NODES = ("gpu|gpu001|96|2000000|gpu:h100:8(S:0-1)|idle|\n"
               "gpu|gpu002|96|2000000|gpu:h100:4(S:0,2),gpu:a100:4(S:1,3)|mixed|\n"
               "cpu|cpu01|32|256000|(null)|idle+drain|\n")


def _gpu_cluster(n_nodes=16, max_time="2-00:00:00"):
    nodes = tuple(NodeInfo(f"gpu{i:03d}", 96, 2_000_000, 8, "IDLE") for i in range(1, n_nodes + 1))
    return {"gpu": PartitionInfo("gpu", True, "UP", nodes, None, parse_minutes(max_time)),
            "cpu": PartitionInfo("cpu", False, "UP", tuple(NodeInfo(f"cpu0{i}", 32, 256_000, 0, "IDLE")
                                                           for i in (1, 2)), 1, None)}


def test_sinfo_partitions_nodes_gres_and_time_limits_are_read():
    partitions = partitions_from_sinfo(SINFO_PARTITIONS, SINFO_NODES)
    assert partitions == {
        "gpu": PartitionInfo("gpu", True, "UP", (NodeInfo("gpu001", 96, 2_000_000, 8, "IDLE"),
                                                 NodeInfo("gpu002", 96, 2_000_000, 8, "MIXED")),
                             None, 2880),
        "cpu": PartitionInfo("cpu", False, "UP", (NodeInfo("cpu01", 32, 256_000, 0, "IDLE+DRAIN"),), 1, None),
        "spare": PartitionInfo("spare", False, "DOWN", (), 4, 30),
    }, partitions
    assert gpu_count("gpu:a100:4(S:0),gpu:h100:4,shard:8") == 8
    # socket lists hold commas of their own
    assert gpu_count("gpu:4(S:0,2)") == 4
    assert gpu_count("gpu:a100:2(S:0,1),gpu:2(S:0,1)") == 4
    assert gpu_count("(null)") == 0
    # sinfo prints "infinite", M:SS, H:MM:SS and D-HH:MM:SS; scontrol and sbatch the other forms
    assert [parse_minutes(x) for x in ("infinite", "UNLIMITED", "30", "10:30", "30:00", "2:00:00",
                                       "1-00:00:00", "2-12")] == [None, None, 30, 11, 30, 120, 1440, 3600]


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(partition="h200"), "--partition=h200: no such partition; this cluster has cpu, gpu"),
    (dict(nodes=17, gpus_per_node=8), "--nodes=17: partition gpu has only 16 node(s)"),
    (dict(nodes=2, partition="cpu"), "--nodes=2: partition cpu allows at most 1 node(s) per job"),
    (dict(gpus_per_node=16),
     "--gpus-per-node: the job needs 16 GPU(s) per node but the largest node of partition gpu has 8"),
    (dict(gpus_per_node=8, cpus_per_task=16), "--tasks-per-node/--cpus-per-task: the job needs 128 CPU(s)"),
    (dict(mem_gb=4096), "--mem-gb: the job needs 4194304 MB of memory per node"),
    (dict(time_min=3000), "--time=3000: partition gpu allows at most 2880 min per job"),
])
def test_request_the_partition_cannot_hold_is_refused_naming_the_flag(request_kwargs, message):
    with pytest.raises(SlurmRequestError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_fits(Resources(**request_kwargs), _gpu_cluster())


def test_request_that_fits_uses_the_default_partition():
    assert check_fits(Resources(nodes=16, gpus_per_node=8, cpus_per_task=12), _gpu_cluster()).name == "gpu"


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(nodes=0), "--nodes=0 must be at least 1"),
    (dict(gpus_per_node=8, tasks_per_node=4), "--tasks-per-node=4 with --gpus-per-node=8"),
    (dict(time_min=2, signal_delay_s=120), "--signal-delay-s=120 must be shorter than --time=2 min"),
    (dict(max_requeues=-1), "--max-requeues=-1 must be at least 0"),
])
def test_malformed_request_is_refused_naming_the_flag(request_kwargs, message):
    with pytest.raises(SlurmRequestError, match=message):
        Resources(**request_kwargs).validate()


def test_tasks_default_to_one_per_gpu_and_the_signal_fits_short_time_limits():
    assert Resources(nodes=16, gpus_per_node=8).world_size == 128
    assert Resources(nodes=2).world_size == 2
    assert Resources(time_min=1).checkpoint_signal_s == 30
    assert Resources(time_min=600).checkpoint_signal_s == 120


def test_jobs_json_keeps_every_concurrent_update(tmp_path):
    registry.add_job(tmp_path, {"job_id": "7", "state": "SUBMITTED"})
    threads = [threading.Thread(target=registry.add_event, args=(tmp_path, "7", "tick"), kwargs={"n": i})
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (job,) = registry.read_jobs(tmp_path)
    assert sorted(e["n"] for e in job["events"]) == list(range(20))
    registry.add_event(tmp_path, "8", "started", state="RUNNING")  # a job the submitter never recorded
    assert [j["state"] for j in registry.read_jobs(tmp_path)] == ["SUBMITTED", "RUNNING"]
    assert not list(tmp_path.glob("jobs.json.tmp*"))


def test_signals_only_set_flags(monkeypatch):
    from megatrain.slurm.job import StopSignals

    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        flags = StopSignals(signal.SIGUSR2).install()
        assert not flags.agreed_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert (flags.terminate, flags.requeue, flags.agreed_stop()) == (True, False, True)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flags.requeue and flags.received_at is not None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_status_reports_failed_job_with_exit_code_error_and_log(tmp_path, monkeypatch):
    import megatrain.slurm.status as status_mod

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n')
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002\n")
    err = tmp_path / "9_0_log.err"
    err.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "megatrain.errors.DataError: shard 3 is truncated\n"
                   "srun: error: task 0: Exited with exit code 1\n")
    registry.add_job(tmp_path, {"job_id": "9", "state": "SUBMITTED", "stdout": "o", "stderr": str(err)})
    monkeypatch.setattr(status_mod, "_sacct", lambda ids: ({"9": [
        {"JobIDRaw": "9", "State": "REQUEUED", "ExitCode": "0:0", "Elapsed": "00:01:00", "NodeList": "n1"},
        {"JobIDRaw": "9", "State": "FAILED", "ExitCode": "1:0", "Elapsed": "00:00:30",
         "NodeList": "n1"}]}, ""))
    status = status_mod.collect(tmp_path)
    assert (status.step, status.latest_checkpoint) == (2, "step_0000002")
    (job,) = status.jobs
    assert (job.state, job.exit_code, job.restarts) == ("FAILED", "1:0", 1)
    assert job.error == "megatrain.errors.DataError: shard 3 is truncated"
    text = status_mod.format_status(status)
    assert "job 9  FAILED  exit 1:0  2 run(s), 1 restart(s)" in text
    assert f"log: {err}" in text
    assert json.loads(status_mod.to_json(status))["jobs"][0]["restarts"] == 1


def test_status_of_a_directory_without_jobs_is_a_clear_error(tmp_path):
    from megatrain.errors import UserError
    from megatrain.slurm.status import collect

    with pytest.raises(UserError, match="no jobs.json"):
        collect(tmp_path)


def test_processes_asked_for_must_match_the_parallel_layout():
    from megatrain.slurm.submit import check_process_layout

    check_process_layout(load_config(None, []), Resources())
    check_process_layout(load_config(None, ["parallel.dp=2"]), Resources(nodes=2))
    with pytest.raises(ConfigError, match=r"^--nodes=2 x 1 task\(s\) per node = 2 process\(es\): "
                                          r"parallel.dp \* parallel.tp \* parallel.pp = 1 \* 1 \* 1 = 1"):
        check_process_layout(load_config(None, []), Resources(nodes=2))
    with pytest.raises(ConfigError, match="parallel.tp=3 must divide model.n_heads=4"):
        check_process_layout(load_config(None, ["parallel.tp=3"]), Resources(tasks_per_node=3))


def test_run_dir_of_another_model_is_refused_before_queueing(tmp_path):
    from megatrain.run_dir import RunDir

    old = load_config(None, [f"run.dir={tmp_path}"])
    run_dir = RunDir(tmp_path)
    run_dir.write_config(old)
    run_dir.checkpoint_path(50).mkdir(parents=True)  # the step folders count
    run_dir.check_same_model(old)
    with pytest.raises(ConfigError, match="model.dim differ"):
        run_dir.check_same_model(load_config(None, [f"run.dir={tmp_path}", "model.dim=256"]))


def test_resubmitting_a_run_whose_vocabulary_was_taken_from_the_dataset_is_accepted(tmp_path):
    """The trainer saves the resolved vocabulary (0 -> the tokenizer's); the same command, with
    model.vocab_size=0 again, must resume - an explicit different size must not."""
    from megatrain.run_dir import RunDir

    run_dir = RunDir(tmp_path)
    run_dir.write_config(load_config(None, [f"run.dir={tmp_path}", "model.vocab_size=4096"]))
    run_dir.checkpoint_path(50).mkdir(parents=True)  # the step folders count
    run_dir.check_same_model(load_config(None, [f"run.dir={tmp_path}"]))  # vocab_size=0
    with pytest.raises(ConfigError, match="model.vocab_size differ"):
        run_dir.check_same_model(load_config(None, [f"run.dir={tmp_path}", "model.vocab_size=8192"]))


def test_code_snapshot_holds_every_installed_part_without_caches(tmp_path):
    from megatrain.slurm.snapshot import write_snapshot

    root = write_snapshot(tmp_path / "code")
    for module in ("megatrain/trainer.py", "megatrain/slurm/job.py", "megatrain/kernels/__init__.py",
                   "megatrain/data_pipelines/__init__.py"):
        assert (root / module).is_file(), module
    assert not list(root.rglob("__pycache__")) and not list(root.rglob("*.pyc"))


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SLURM executor needs srun on PATH")
@pytest.mark.parametrize("config, nodes, parallel", [
    ("6.7b_n4.yaml", 8, dict(dp=64, tp=1, pp=1, activation_checkpointing="selective")),
    ("13b_n4.yaml", 16, dict(dp=8, tp=8, pp=2, pp_schedule="1f1b", sequence_parallel="true")),
])
def test_paper_runs_render_the_documented_sbatch_script(monkeypatch, tmp_path, config, nodes, parallel):
    """The README's SLURM requests, on a described 16 x 8-GPU cluster: layout accepted, script right."""
    import megatrain.slurm.submit as submit_mod

    monkeypatch.setattr(submit_mod, "read_partitions", lambda: _gpu_cluster())
    cfg = load_config(REPO / "configs" / "paper" / config,
                      [f"run.dir={tmp_path}/run", "data.path=/shared/data",
                       *(f"parallel.{k}={v}" for k, v in parallel.items())])
    res = Resources(nodes=nodes, gpus_per_node=8, cpus_per_task=12, mem_gb=0, time_min=1440,
                    exclusive=True, max_requeues=5, signal_delay_s=300, partition="gpu")
    result = submit_mod.submit(cfg, res, dry_run=True)
    script = result.sbatch_script
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --exclusive", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@300", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --mem=0GB", f"#SBATCH --chdir={tmp_path}/run"):
        assert line in script, (line, script)
    assert result.resources.world_size == nodes * 8 == parallel["dp"] * parallel["tp"] * parallel["pp"]
    assert not (tmp_path / "run").exists()


def _agree_worker(rank, init_file, flags_out):
    import torch.distributed as dist

    from megatrain.slurm.job import StopSignals

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    flags = StopSignals(signal.SIGUSR2)
    seen = [flags.agreed_stop()]
    if rank == 1:
        flags.requeue = True  # only rank 1 got the signal
    seen.append(flags.agreed_stop())
    flags_out.put((rank, seen, flags.requeue))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_a_signal_seen_by_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, tmp_path / "init", out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, [False, True], True), (1, [False, True], True)], results


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SLURM executor needs srun on PATH")
def test_a_gpu_layout_predicted_not_to_fit_is_refused_unless_told_otherwise(monkeypatch, tmp_path):
    """The 13B README layout on 16 GB GPUs: refused with the planner's numbers and fixes;
    --no-plan-check submits it anyway; on the documented 80 GB GPUs it is accepted (test above)."""
    import megatrain.slurm.submit as submit_mod

    monkeypatch.setattr(submit_mod, "read_partitions", lambda: _gpu_cluster())
    cfg = load_config(REPO / "configs" / "paper" / "13b_n4.yaml",
                      [f"run.dir={tmp_path}/run", "data.path=/shared/data", "parallel.dp=8",
                       "parallel.tp=8", "parallel.pp=2", "parallel.sequence_parallel=true"])
    res = Resources(nodes=16, gpus_per_node=8, time_min=60, partition="gpu")
    with pytest.raises(ConfigError, match=r"megatrain plan predicts [\d.]+ GB on rank \d+ .*"
                                          r"--device-memory-gb 16.*--no-plan-check"):
        submit_mod.submit(cfg, res, dry_run=True, device_memory_gb=16)
    result = submit_mod.submit(cfg, res, dry_run=True, device_memory_gb=16, plan_check=False)
    assert "#SBATCH --nodes=16" in result.sbatch_script


@pytest.mark.parametrize("stderr, expected", [
    ("sinfo: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
     "sinfo: fatal: Could not establish a configuration source",
     "no SLURM cluster reachable from this machine"),
    ("sinfo: error: Invalid partition name specified", "failed: sinfo: error: Invalid partition"),  # control
])
def test_an_unreachable_cluster_is_said_in_one_sentence_with_the_fix(tmp_path, monkeypatch, stderr, expected):
    fake = tmp_path / "sinfo"
    fake.write_text(f"#!/bin/sh\ncat >&2 <<'END'\n{stderr}\nEND\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SlurmRequestError) as err:
        read_partitions()
    assert expected in str(err.value)
    assert ("SLURM_CONF" in str(err.value)) == expected.startswith("no SLURM")


def test_submit_flags_are_the_resources_fields_with_their_types_and_defaults():
    """One owner: ``Resources`` declares each flag's default and help; the parser derives them."""
    from megatrain.cli import build_parser
    from megatrain.slurm.cli import resources_from_args
    from megatrain.slurm.resources import Resources

    parse = build_parser(["submit"]).parse_args
    assert resources_from_args(parse(["submit"])) == Resources()
    asked = resources_from_args(parse(["submit", "--tasks-per-node", "2", "--mem-gb", "1.5", "--time", "5",
                                       "--exclusive", "--signal-delay-s", "30", "--partition", "gpu"]))
    assert asked == Resources(tasks_per_node=2, mem_gb=1.5, time_min=5, exclusive=True,
                              signal_delay_s=30, partition="gpu")
    with pytest.raises(SystemExit):  # argparse: "invalid int value"
        parse(["submit", "--tasks-per-node", "two"])

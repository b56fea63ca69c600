"""What a job asks SLURM for, and whether the cluster can ever give it.

``Resources`` holds the request (one field per ``megatrain submit`` flag). ``read_partitions``
reads the partitions and their nodes from ``sinfo``; ``check_fits`` refuses, before anything is
queued, a request that would pend forever: an unknown partition, more nodes than the partition
has, more CPUs/GPUs/memory per node than any node has, a time above the partition's limit. Each
error names the flag to change.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from megatrain.cli_fields import option
from megatrain.errors import UserError


class SlurmRequestError(UserError):
    """A resource request the cluster cannot satisfy, or SLURM cannot be reached."""


@dataclass
class Resources:
    """One field per ``megatrain submit`` flag: each owns its default and help (cli_fields)."""

    nodes: int = option(1, "nodes")
    gpus_per_node: int = option(0, "GPUs per node; one training process per GPU (0: CPU)")
    tasks_per_node: int | None = option(None, "processes per node (default: --gpus-per-node, or 1 "
                                              "without GPUs)", type=int)
    cpus_per_task: int | None = option(None, "CPUs per process (default: the partition's)", type=int)
    mem_gb: float | None = option(None, "memory per node in GB (0 = all of it; default: the "
                                        "partition's)", type=float)
    partition: str | None = option(None, "SLURM partition (default: the cluster's default)")
    account: str | None = option(None, "SLURM account")
    qos: str | None = option(None, "SLURM quality of service")
    constraint: str | None = option(None, "SLURM node features, e.g. h100")
    time_min: int = option(60, "time limit per run of the job, in minutes; the job checkpoints and "
                               "requeues itself before it", flag="--time")
    exclusive: bool = option(False, "whole nodes only")
    max_requeues: int = option(3, "requeues allowed (time limits, preemptions, node failures)")
    signal_delay_s: int | None = option(None, "seconds before the time limit the job is told to "
                                              "checkpoint (default 120, or half of --time if "
                                              "shorter); allow one step plus one checkpoint save",
                                        type=int)
    job_name: str = option("megatrain", "SLURM job name")

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    @property
    def checkpoint_signal_s(self) -> int:
        """Seconds before the time limit at which SLURM sends the checkpoint signal."""
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        return min(120, self.time_min * 30)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def validate(self) -> None:
        """Rules that need no cluster; each failure names the flag."""
        for flag, value, low in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                 ("--time", self.time_min, 1), ("--max-requeues", self.max_requeues, 0),
                                 ("--signal-delay-s", self.checkpoint_signal_s, 1)):
            if value < low:
                raise SlurmRequestError(f"{flag}={value} must be at least {low}")
        for flag, value in (("--tasks-per-node", self.tasks_per_node),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise SlurmRequestError(f"{flag}={value} must be at least 1")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise SlurmRequestError(f"--mem-gb={self.mem_gb} must be >= 0 (0 = all of each node's memory)")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise SlurmRequestError(
                f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: "
                f"training runs one process per GPU; leave --tasks-per-node out (it defaults to "
                f"--gpus-per-node)")
        if self.checkpoint_signal_s >= self.time_min * 60:
            raise SlurmRequestError(
                f"--signal-delay-s={self.signal_delay_s} must be shorter than --time={self.time_min} "
                f"min ({self.time_min * 60} s): the job is told that long before its time limit to "
                f"checkpoint and requeue")

    def to_dict(self) -> dict:
        return {**asdict(self), "ntasks_per_node": self.ntasks_per_node, "world_size": self.world_size,
                "checkpoint_signal_s": self.checkpoint_signal_s}

    def describe(self) -> str:
        """The request in words, for --dry-run and the submit summary."""
        per_node = [f"{self.ntasks_per_node} task(s)"]
        if self.gpus_per_node:
            per_node.append(f"{self.gpus_per_node} GPU(s)")
        if self.cpus_per_task:
            per_node.append(f"{self.cpus_per_task} CPU(s) per task")
        if self.mem_gb is None:
            per_node.append("default memory")
        else:
            per_node.append(f"{self.mem_gb:g} GB memory" if self.mem_gb else "all memory")
        extra = [f"{k} {v}" for k, v in (("account", self.account), ("qos", self.qos),
                                          ("constraint", self.constraint)) if v]
        if self.exclusive:
            extra.append("exclusive nodes")
        return (f"{self.nodes} node(s) x [{', '.join(per_node)}] = {self.world_size} process(es); "
                f"partition {self.partition or '(cluster default)'}; time limit {self.time_min} min; "
                f"checkpoint signal {self.checkpoint_signal_s} s before it; at most {self.max_requeues} "
                f"requeue(s)" + (f"; {', '.join(extra)}" if extra else ""))


# ------------------------------------------------------------------------------------------------
# Reading the cluster

# sinfo -O fields, each given as "Name:|": no width, so sinfo prints the value whole (a width cuts
# it), and "|" after it, a character none of these values can hold.
PARTITION_FIELDS = ("PartitionName", "Partition", "Available", "Time", "Size")
NODE_FIELDS = ("PartitionName", "NodeList", "CPUs", "Memory", "Gres", "StateComplete")


# what sinfo says when it finds no controller (no slurm.conf, no DNS SRV record, controller down)
_UNREACHABLE = ("Could not establish a configuration source", "Unable to contact slurm controller",
                "fetch_config", "No such file or directory")


def _sinfo(fields: tuple[str, ...], *args: str) -> str:
    if shutil.which("sinfo") is None:
        raise SlurmRequestError("sinfo not found: run `megatrain submit` where the SLURM client "
                                "commands are installed (a login node), or set PATH/SLURM_CONF")
    # --noconvert: counts as plain numbers (1024 CPUs would print as "1K"). SINFO_* variables
    # (SINFO_PARTITION, SINFO_ALL ...) would filter what is read: the request is checked against
    # the cluster, not against the caller's sinfo defaults.
    command = ["sinfo", "--noheader", "--noconvert", *args, "-O", ",".join(f"{f}:|" for f in fields)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINFO_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        cause = lines[-1] if lines else f"exit status {done.returncode}"
        if any(s in done.stderr for s in _UNREACHABLE):
            raise SlurmRequestError(
                f"no SLURM cluster reachable from this machine ({cause}): submit (and --dry-run, "
                "which checks the request against the cluster's partitions) runs on a login node "
                "whose slurm.conf names the controller; elsewhere set SLURM_CONF to that file")
        raise SlurmRequestError(f"`{' '.join(command)}` failed: {cause}")
    return done.stdout


def parse_sinfo(text: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of ``sinfo --noheader -O "A:|,B:|,..."`` output, as ``{field: value}``."""
    return [dict(zip(fields, line.split("|"))) for line in text.splitlines() if line.strip()]


def gpu_count(gres: str) -> int:
    """GPUs in a node's GRES: ``gpu:8``, ``gpu:a100:4(S:0-1),gpu:h100:4``, ``(null)``."""
    total = 0
    # the socket part "(S:0,2)" holds commas itself: drop it before splitting the items
    for item in re.sub(r"\(.*?\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_minutes(limit: str) -> int | None:
    """A SLURM time limit (``infinite``, ``UNLIMITED``, ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH[:MM[:SS]]``) in minutes; None when unlimited."""
    if limit.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return (int(days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    default: bool
    state: str
    nodes: tuple[NodeInfo, ...]
    max_nodes: int | None
    max_time_min: int | None


def read_partitions() -> dict[str, PartitionInfo]:
    return partitions_from_sinfo(_sinfo(PARTITION_FIELDS), _sinfo(NODE_FIELDS, "--Node"))


def partitions_from_sinfo(partition_text: str, node_text: str) -> dict[str, PartitionInfo]:
    """The partitions in ``sinfo -O PARTITION_FIELDS`` output (a row per partition and group of
    alike nodes, one for a partition without nodes) with their nodes from ``sinfo --Node -O
    NODE_FIELDS`` (a row per node and partition)."""
    nodes: dict[str, list[NodeInfo]] = {}
    for r in parse_sinfo(node_text, NODE_FIELDS):
        nodes.setdefault(r["PartitionName"], []).append(NodeInfo(
            r["NodeList"], int(r["CPUs"]), int(r["Memory"]), gpu_count(r["Gres"]),
            r["StateComplete"].upper()))
    partitions = {}
    for r in parse_sinfo(partition_text, PARTITION_FIELDS):
        name = r["PartitionName"]
        if name in partitions:
            continue
        max_nodes = r["Size"].rpartition("-")[2]  # "1-infinite", "1-4", or "4" when min = max
        partitions[name] = PartitionInfo(
            name, r["Partition"] == name + "*", r["Available"].upper(), tuple(nodes.get(name, ())),
            None if max_nodes == "infinite" else int(max_nodes), parse_minutes(r["Time"]))
    return partitions


def check_fits(res: Resources, partitions: dict[str, PartitionInfo]) -> PartitionInfo:
    """Refuse a request the partition can never run; return the partition used."""
    if res.partition is None:
        default = [p for p in partitions.values() if p.default]
        if not default:
            raise SlurmRequestError(f"the cluster has no default partition: pass --partition (one of "
                                    f"{', '.join(sorted(partitions))})")
        part = default[0]
    elif res.partition not in partitions:
        raise SlurmRequestError(f"--partition={res.partition}: no such partition; this cluster has "
                                f"{', '.join(sorted(partitions)) or 'none'}")
    else:
        part = partitions[res.partition]
    where = f"partition {part.name}"
    if res.nodes > len(part.nodes):
        raise SlurmRequestError(f"--nodes={res.nodes}: {where} has only {len(part.nodes)} node(s)")
    if part.max_nodes is not None and res.nodes > part.max_nodes:
        raise SlurmRequestError(f"--nodes={res.nodes}: {where} allows at most {part.max_nodes} "
                                f"node(s) per job (MaxNodes)")
    if part.max_time_min is not None and res.time_min > part.max_time_min:
        raise SlurmRequestError(f"--time={res.time_min}: {where} allows at most {part.max_time_min} "
                                f"min per job (MaxTime); lower --time and rely on requeues")
    cpus = res.ntasks_per_node * (res.cpus_per_task or 1)
    need = [("--gpus-per-node", res.gpus_per_node, lambda n: n.gpus, "GPU(s)"),
            ("--tasks-per-node/--cpus-per-task" if res.cpus_per_task else "--tasks-per-node", cpus,
             lambda n: n.cpus, "CPU(s)"),
            ("--mem-gb", int((res.mem_gb or 0) * 1024), lambda n: n.mem_mb, "MB of memory")]
    for flag, amount, have, unit in need:
        most = max((have(n) for n in part.nodes), default=0)
        if amount > most:
            raise SlurmRequestError(f"{flag}: the job needs {amount} {unit} per node but the largest "
                                    f"node of {where} has {most}")
    fitting = [n for n in part.nodes if all(have(n) >= amount for _, amount, have, _ in need)]
    if len(fitting) < res.nodes:
        raise SlurmRequestError(f"--nodes={res.nodes}: only {len(fitting)} node(s) of {where} have "
                                f"{res.gpus_per_node} GPU(s), {cpus} CPU(s) and the memory asked for")
    return part

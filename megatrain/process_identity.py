"""Which process a pid names, across hosts, kernel boots and PID namespaces, and whether it still
runs as far as this process can tell.

A pid names a process only inside one PID namespace of one kernel boot. Containers that share a
host name (docker ``--network=host``, Kubernetes ``hostNetwork``, ``unshare --pid``) number their
processes from 1 each and cannot see each other's, so "process 4242 on node12" may be alive in a
container next door while ``kill(4242, 0)`` here says it does not exist, or names another
process. A process is therefore identified by (host, boot id, PID namespace, pid, start time), and
its liveness is looked up only from the same boot and PID namespace; anything else is unknown
from here. Linux only: elsewhere the boot id, namespace and start time are None on both sides and
a pid on the same host is taken as comparable, as before.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class Liveness(enum.Enum):
    RUNNING = "running"
    GONE = "gone"
    UNKNOWN = "unknown"  # cannot be looked up from here (another host, boot or PID namespace)


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    boot_id: str | None = None  # the kernel boot's random id (containers share their host's)
    pid_ns: str | None = None  # readlink /proc/self/ns/pid, e.g. "pid:[4026531836]"
    start: int | None = None  # start time in clock ticks after boot (/proc/PID/stat field 22)

    @classmethod
    def of_this_process(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _boot_id(), _pid_namespace(), _start_ticks(pid))

    @classmethod
    def from_record(cls, record: dict) -> ProcessIdentity:
        """From a lock record; keys an older megatrain did not write are None."""
        start = record.get("pid_start")
        return cls(str(record.get("host")), int(record.get("pid", -1)), record.get("boot_id"),
                   record.get("pid_ns"), int(start) if start is not None else None)

    def as_record(self) -> dict:
        return {"host": self.host, "boot_id": self.boot_id, "pid_ns": self.pid_ns, "pid": self.pid,
                "pid_start": self.start}

    def liveness(self) -> tuple[Liveness, str]:
        """Whether this process still runs, as seen from the calling process, and why."""
        here = ProcessIdentity.of_this_process()
        where = f"process {self.pid} on {self.host}"
        if self.host != here.host:
            return Liveness.UNKNOWN, f"{self.host} is another host"
        if self.boot_id != here.boot_id:
            return Liveness.UNKNOWN, (f"{where} ran under another boot of this host name"
                                      if self.boot_id else
                                      f"{where} was recorded without its boot id and PID namespace "
                                      f"(by an older megatrain)")
        if self.pid_ns != here.pid_ns:
            return Liveness.UNKNOWN, (f"{where} runs in another PID namespace ({self.pid_ns}, e.g. a "
                                      f"container sharing this host name), whose processes cannot be "
                                      f"seen from here ({here.pid_ns})")
        if not _pid_exists(self.pid):
            return Liveness.GONE, f"its {where} no longer exists"
        now_start = _start_ticks(self.pid)
        if self.start is not None and now_start is not None and now_start != self.start:
            return Liveness.GONE, (f"its {where} has ended (that pid now names a process started at "
                                   f"another time)")
        return Liveness.RUNNING, f"{where} is running"


def boot_time() -> float | None:
    """When this kernel booted (epoch seconds; ``btime`` of /proc/stat), None if unknown."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _boot_id() -> str | None:
    try:
        with open(BOOT_ID_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces and ')': count from the last
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 overall: starttime


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

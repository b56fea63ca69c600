"""Running model-written programs where they can do no harm.

Every program runs in a fresh child process inside a bubblewrap (``bwrap``) sandbox:

- it sees only the system's programs and libraries (``/usr``, ``/etc``, ...) and the Python
  interpreter, read-only, a private ``/dev`` and ``/proc``, and ``/tmp``: a fresh empty directory
  of its own (its working directory, ``HOME`` and ``TMPDIR``), deleted afterwards. It can write
  nowhere else, and the rest of the host (home directories, /run, /var, the evaluator's files,
  other programs' Unix sockets) is not there at all;
- its own network namespace (only a loopback of its own: even the host's 127.0.0.1 is
  unreachable), and its own pid, IPC and UTS namespaces;
- a clean environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only) and ``python -I``;
- no capabilities and ``no_new_privs`` (setuid binaries give nothing back); started as root, it
  also drops to a fresh unprivileged uid, because root ignores RLIMIT_NPROC;
- rlimits on CPU time, address space, file size, processes and open files (``Limits``), and a
  wall-time limit after which the sandbox is killed; its pid namespace dies with it, so no process
  it started survives.

Anything a program does beyond that (an endless loop, a fork bomb, a huge allocation, a write or
connection attempt, exiting early) ends as a failed ``SandboxResult``, never as an exception in the
evaluator. Where bubblewrap is missing or cannot create its namespaces, ``Sandbox()`` refuses with
``SandboxUnavailable`` rather than run anything unsandboxed, and a probe run checks that the
sandbox really drops privileges before the first program runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatrain.errors import UserError

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: `dnf install "
                "bubblewrap`; `bash install.sh` does it when run as root)")
WORK_PREFIX = "megatrain-sandbox-"
OUTPUT_TAIL = 16 * 1024  # characters of a program's stdout / stderr kept in its result
# Started as root, each program runs as a uid drawn from this range, one no account uses: RLIMIT_NPROC
# counts the processes of a uid across the whole machine, so programs running side by side must not
# share one (a fork bomb would starve its neighbours).
UID_RANGE = (1_500_000_000, 1_500_000_000 + (1 << 28))
# The file system a program sees, read-only, besides the interpreter, /dev, /proc and its /tmp.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Once everything is mounted: bwrap's own root and /dev become read-only too (writing to a device
# such as /dev/null stays possible, creating files there does not).
SEAL = ["--remount-ro", "/", "--remount-ro", "/dev"]


class SandboxUnavailable(UserError):
    """No way to isolate model-written code on this machine; nothing was run."""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10  # CPU seconds per process (RLIMIT_CPU)
    wall_s: float = 20.0  # the whole sandbox is killed after this
    memory_bytes: int = 1 << 30  # address space per process (RLIMIT_AS)
    file_bytes: int = 16 << 20  # largest file it may write, its output included (RLIMIT_FSIZE)
    processes: int = 16  # processes and threads (RLIMIT_NPROC)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass
class SandboxResult:
    returncode: int | None  # None: killed at the wall-time limit; negative: killed by that signal
    stdout: str  # the last OUTPUT_TAIL characters
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Sandbox:
    """Runs Python source in a bubblewrap sandbox; see the module docstring. Thread-safe."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        if not sys.platform.startswith("linux"):
            raise SandboxUnavailable(f"running model-written code needs Linux namespaces (this is "
                                     f"{sys.platform}); evaluate on a Linux machine")
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable(f"model-written code only runs inside a bubblewrap sandbox and "
                                     f"`bwrap` is not on PATH: {INSTALL_HINT}")
        self.as_root = os.geteuid() == 0
        self.python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self._entry = (Path(__file__).with_name("sandbox_entry.py")).read_text()
        self._command = [bwrap, *self._isolation()]
        self._probe()

    # ---- running a program -----------------------------------------------------------------------
    def run(self, source: str) -> SandboxResult:
        """Run ``source`` as a Python program in a fresh sandbox and report how it ended."""
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
        try:
            # named after its directory: a process left over from this run would show it in its cmdline
            program = f"{work.name}.py"
            (work / program).write_text(source, encoding="utf-8")
            uid = None
            if self.as_root:
                uid = UID_RANGE[0] + secrets.randbelow(UID_RANGE[1] - UID_RANGE[0])
                os.chown(work, uid, uid)
            config = json.dumps({**asdict(self.limits), "uid": uid, "python": self.python})
            command = [*self._command, "--bind", str(work), "/tmp", *SEAL,
                       "--", self.python, "-I", "-S", "-c", self._entry, config, f"/tmp/{program}"]
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                returncode, seconds = self._run_until_done(command, out, err)
                return SandboxResult(returncode, _tail(out), _tail(err), seconds)
        finally:
            _remove_tree(work)

    def _run_until_done(self, command, out, err) -> tuple[int | None, float]:
        started = time.monotonic()
        info_read, info_write = os.pipe()  # bwrap reports the sandbox's first process here
        try:
            # its own session: the wall-time kill reaches bwrap and anything else in its group
            proc = subprocess.Popen([command[0], "--info-fd", str(info_write), *command[1:]],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(info_write,),
                                    start_new_session=True)
            os.close(info_write)
            info_write = None
            child = _child_pid(info_read)
        finally:
            os.close(info_read)
            if info_write is not None:
                os.close(info_write)
        try:
            returncode = proc.wait(timeout=self.limits.wall_s)
        except subprocess.TimeoutExpired:
            returncode = None
            # the namespace's init first (bwrap, still alive, has not reaped it: its pid is still
            # its), then bwrap and anything in its process group
            _kill(lambda: os.kill(child, signal.SIGKILL) if child is not None else None)
            _kill(lambda: os.killpg(proc.pid, signal.SIGKILL))
            proc.wait()
            _wait_gone(child)
        # after a normal exit bwrap has waited for the namespace's init, and the init's exit for
        # every process in the namespace: nothing is left
        return returncode, time.monotonic() - started

    # ---- the sandbox ----------------------------------------------------------------------------
    def _isolation(self) -> list[str]:
        """bwrap's options before the work directory's bind (see ``run``)."""
        options = ["--die-with-parent", "--new-session",
                   "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                   "--dev", "/dev", "--proc", "/proc",
                   "--perms", "0555", "--size", str(64 << 10), "--tmpfs", "/dev/shm",
                   "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
                   "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
                   "--chdir", "/"]  # the entry script enters /tmp: only its uid may
        if self.as_root:
            # As root, bwrap keeps every capability unless told otherwise: keep only what the entry
            # script needs to drop to its unprivileged uid (after which the kernel clears these too).
            options += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:  # an unprivileged bwrap needs a user namespace; the uid stays the user's
            options += ["--unshare-user"]
        # Only the system's programs and libraries and the interpreter are there, read-only. Not
        # merely read-only elsewhere: a read-only mount does not stop connect() on a Unix socket
        # file (a database's, a container runtime's, a session bus), so those must not be in sight.
        visible = []
        for folder in map(Path, SYSTEM_DIRS):
            if folder.is_symlink():  # merged /usr: /lib -> usr/lib
                options += ["--symlink", os.readlink(folder), str(folder)]
            elif folder.is_dir():
                options += ["--ro-bind", str(folder), str(folder)]
                visible.append(folder.resolve())
        for tree in (Path(sys.base_prefix).resolve(), Path(self.python).parent):
            if any(v == tree or v in tree.parents for v in visible):
                continue
            for step in reversed(tree.parents[:-1]):  # its parent folders, passable by anyone
                options += ["--perms", "0755", "--dir", str(step)]
            options += ["--ro-bind", str(tree), str(tree)]
            visible.append(tree)
        return options

    def _probe(self) -> None:
        """Run one program that reports its privileges; refuse unless the sandbox holds."""
        probe = ("import json, os\n"
                 "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
                 "try:\n"
                 "    open(os.path.join(os.path.dirname(os.__file__), 'megatrain-probe'), 'w')\n"
                 "    writable = True\n"
                 "except OSError:\n"
                 "    writable = False\n"
                 "print(json.dumps({'uid': os.getuid(), 'caps': int(status['CapEff'], 16),\n"
                 "                  'nnp': int(status['NoNewPrivs']), 'writable': writable}))\n")
        result = self.run(probe)
        try:
            facts = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SandboxUnavailable(
                f"bubblewrap could not start a sandbox here (exit status {result.returncode}): "
                f"{result.stderr.strip()[-500:] or 'no message'}. As a normal user it needs "
                f"unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or "
                f"user.max_user_namespaces > 0); or run the evaluation as root") from None
        problems = [what for what, bad in (("it runs as root", facts["uid"] == 0),
                                           ("it keeps capabilities", facts["caps"] != 0),
                                           ("no_new_privs is off", facts["nnp"] != 1),
                                           ("it can write to the interpreter's files", facts["writable"]))
                    if bad]
        if problems:
            raise SandboxUnavailable(f"the bubblewrap sandbox does not hold on this machine "
                                     f"({'; '.join(problems)}); refusing to run model-written code")


def _kill(action) -> None:
    try:
        action()
    except ProcessLookupError:
        pass


def _child_pid(info_fd: int) -> int | None:
    """The pid (in our namespace) of the sandbox's first process, the init of its pid namespace,
    from bwrap's --info-fd; None if bwrap failed before starting it."""
    data = b""
    while chunk := os.read(info_fd, 4096):
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _wait_gone(pid: int | None, patience_s: float = 10.0) -> None:
    """Wait until the sandbox's init has exited. When the init of a pid namespace exits, the kernel
    kills every other process in it and waits for them: once it is gone (or a zombie waiting for
    its new parent to reap it), nothing the program started is left."""
    deadline = time.monotonic() + patience_s
    while pid is not None and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


def _remove_tree(path: Path) -> None:
    """Delete a work directory, also where the program took away its own permissions."""
    def unlock_and_retry(func, target, _exc_info):
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
            shutil.rmtree(target, onerror=unlock_and_retry)
        else:
            func(target)

    shutil.rmtree(path, onerror=unlock_and_retry)

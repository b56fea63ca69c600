"""The sandbox that runs model-written code (megatrain/eval/sandbox.py).

What is protected: hostile HumanEval completions (an endless loop, a fork bomb, a 50 GB
allocation, writes and ``shutil.rmtree`` outside the work directory, ``os.system``, a connection to
a TCP port and to a Unix socket the test listens on, an output flood, ``sys.exit(0)`` before the
tests, a daemon left behind) each count as failed and leave no trace: the outside files are
unchanged, no listener got a connection, no process of the sandbox survives and its work directory
is gone. Controls show the checks can fail: inside, the program can write to its own folder but to
nothing else it can see, and the host's other files are not there at all; a correct completion
passes; a sandbox that keeps root's privileges is refused by the probe. Without bubblewrap,
nothing runs."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from megatrain.eval import humaneval
from megatrain.eval.sandbox import WORK_PREFIX, Limits, Sandbox, SandboxUnavailable

REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits(cpu_s=1, wall_s=4)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def problem():
    return humaneval.load_problems(limit=1)[0]  # has_close_elements(numbers, threshold)


@pytest.fixture
def victim():
    """A folder with a file, outside /tmp (the sandbox's own /tmp is its work directory), both
    writable by everyone: only the sandbox's read-only file system protects them."""
    folder = REPO / ".cache" / f"sandbox-victim-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("precious")
    folder.chmod(0o777)
    (folder / "precious.txt").chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def unix_listener(victim):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(victim / "socket"))
    os.chmod(victim / "socket", 0o777)  # anyone may connect: only the sandbox stands in the way
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _traces() -> set[str]:
    """Processes and work directories of sandboxes that exist right now."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if WORK_PREFIX in cmdline:
            found.add(f"process {pid}: {cmdline!r}")
    return found | {f"folder {p}" for p in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*")}


@pytest.fixture
def leftovers():
    """What sandboxes started during the test left behind (the call returns the list)."""
    before = _traces()
    return lambda: sorted(_traces() - before)


HOSTILE = {
    "endless loop": "    while True:\n        pass\n",
    "fork bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n"),
    "50 GB allocation": "    blob = bytearray(50 * 2**30)\n    return len(blob) > 0\n",
    "write outside": "    open({file!r}, 'w').write('pwned')\n    return True\n",
    "rmtree outside": "    import shutil\n    shutil.rmtree({folder!r})\n    return True\n",
    "os.system": ("    import os\n    os.system('echo pwned > {file}; rm -rf {folder}; touch {folder}-new')\n"
                  "    return True\n"),
    "connect to a local port": ("    import socket\n"
                                "    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                "    return True\n"),
    "connect to a Unix socket outside": ("    import socket\n"
                                         "    socket.socket(socket.AF_UNIX).connect({unix!r})\n"
                                         "    return True\n"),
    "output flood": "    while True:\n        print('x' * 4096)\n",
    "sys.exit(0) before the tests": "    return True\n\nimport sys\nsys.exit(0)\n",
    "daemon left behind": ("    return True\n\nimport os, time\nif os.fork() == 0:\n    os.setsid()\n"
                           "    time.sleep(120)\nos._exit(0)\n"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completion_fails_and_leaves_no_trace(name, sandbox, problem, victim, listener,
                                                     unix_listener, leftovers):
    file, folder = victim / "precious.txt", victim
    completion = HOSTILE[name].format(file=str(file), folder=str(folder), port=listener.getsockname()[1],
                                      unix=str(victim / "socket"))
    verdict = humaneval.check(sandbox, problem, completion)
    assert not verdict.passed, verdict
    assert file.read_text() == "precious"
    assert sorted(p.name for p in victim.parent.glob(victim.name + "*")) == [victim.name]
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt", "socket"]
    for server in (listener, unix_listener):
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert leftovers() == []


def test_nothing_it_can_see_is_writable_but_its_own_folder(sandbox, victim, leftovers):
    """Control for the hostile writes: outside its /tmp, every folder a program can see refuses a
    new file (the system's folders and the interpreter are read-only, bwrap's own root and /dev
    too), and what lies elsewhere on the host, like the victim folder, is not there at all."""
    probe = ("import errno, json, os\n"
             "places = ['/', '/usr', '/etc', '/dev', '/dev/shm', os.path.dirname(os.__file__), '/tmp']\n"
             "result = {}\n"
             "for place in places:\n"
             "    try:\n"
             "        open(os.path.join(place, 'megatrain-was-here'), 'w').close()\n"
             "        result[place] = 'written'\n"
             "    except OSError as err:\n"
             "        result[place] = errno.errorcode[err.errno]\n"
             f"result['victim visible'] = os.path.exists({str(victim)!r})\n"
             "print(json.dumps(result))\n")
    result = sandbox.run(probe)
    outcome = json.loads(result.stdout)
    assert outcome.pop("/tmp") == "written", outcome  # its own folder works: the probe is sound
    assert outcome.pop("victim visible") is False
    assert all(v in ("EROFS", "EACCES", "EPERM") for v in outcome.values()), outcome
    assert victim.exists() and leftovers() == []


def test_trace_check_sees_a_leftover_process_and_folder(leftovers):
    """Negative control of ``leftovers``: it does report what a sandbox would leave behind."""
    folder = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{folder.name}.py"])
    try:
        # Until the child has exec'd, its /proc cmdline is still pytest's (seen under load in CI)
        deadline = time.monotonic() + 30
        while folder.name not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace"):
            assert time.monotonic() < deadline, "the child never exec'd"
            time.sleep(0.05)
        found = leftovers()
        assert f"folder {folder}" in found
        assert any(t.startswith(f"process {process.pid}:") for t in found), found
    finally:
        process.kill()
        process.wait()
        folder.rmdir()


def test_a_correct_completion_passes(sandbox, problem):
    """Control: the harness that fails the hostile completions passes a correct one."""
    assert humaneval.check(sandbox, problem, problem.canonical_solution).passed


def test_wall_time_limit_kills_a_sleeping_program(sandbox, leftovers):
    result = sandbox.run("import time\ntime.sleep(120)\n")
    assert result.timed_out, result
    assert leftovers() == []


def test_environment_is_clean_and_the_work_directory_private(sandbox):
    os.environ["MEGATRAIN_SECRET_FOR_TEST"] = "leak"
    try:
        result = sandbox.run("import os, json\nprint(json.dumps([sorted(os.environ), os.getcwd(), "
                             "os.listdir('.'), os.getuid()]))\n")
    finally:
        del os.environ["MEGATRAIN_SECRET_FOR_TEST"]
    names, cwd, files, uid = json.loads(result.stdout)
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}, names  # not the secret
    assert cwd == "/tmp" and len(files) == 1 and files[0].startswith(WORK_PREFIX)  # only its program
    assert uid != 0


def test_without_bubblewrap_nothing_runs(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        Sandbox(LIMITS)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a bwrap started as root without dropping it")
def test_probe_refuses_a_sandbox_that_keeps_root(monkeypatch):
    """Negative control of the probe: bwrap as root taking the unprivileged path (user namespace,
    no uid drop) runs the program as root with capabilities; the probe must say so."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="runs as root|keeps capabilities"):
        Sandbox(LIMITS)

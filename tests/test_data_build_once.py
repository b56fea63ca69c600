"""The embedded default corpus has one builder when many processes start at once; the others wait
for it, give up with a clear message after the timeout, and take over from a builder that died."""

import json
import multiprocessing
import os
import socket
import time

import pytest

from megatrain.data_pipelines.build_once import build_once, claim_dir
from megatrain.errors import DataError
from megatrain.process_identity import ProcessIdentity


def fake_build(output_dir, log, seconds=0.5):
    """Builds like prepare_dataset: returns at once for a finished output, else works, then writes the
    manifest last. Appends one line to ``log`` per real build."""

    def build():
        if (output_dir / "manifest.json").exists():
            return
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "manifest.json").write_text("{}")

    return build


def _start(output_dir, log, ready, seconds):
    ready.wait()  # all processes ask at the same moment
    build_once(output_dir, fake_build(output_dir, log, seconds), what="the test corpus", timeout_s=60,
               poll_s=0.05, progress=False)


def test_many_processes_starting_at_once_build_once(tmp_path):
    output_dir, log = tmp_path / "cache" / "corpus", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    procs = [ctx.Process(target=_start, args=(output_dir, log, ready, 0.5)) for _ in range(4)]
    for p in procs:
        p.start()
    ready.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(log.read_text().splitlines()) == 1, "exactly one process built the corpus"
    assert (output_dir / "manifest.json").exists()


def test_without_the_claim_every_process_builds(tmp_path):
    """Negative control: the same race with each process building unconditionally builds 4 times."""
    output_dir, log = tmp_path / "corpus", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def unguarded():
        ready.wait()
        fake_build(output_dir, log, 0.5)()

    procs = [ctx.Process(target=unguarded) for _ in range(4)]
    for p in procs:
        p.start()
    ready.set()
    for p in procs:
        p.join(60)
    assert len(log.read_text().splitlines()) == 4


def write_claim(output_dir, **holder):
    claim = claim_dir(output_dir)
    claim.mkdir(parents=True)
    # this process's identity (host, boot, PID namespace, start time) unless ``holder`` says otherwise
    record = {"owner": "other", **ProcessIdentity.of_this_process().as_record(), "job_id": None,
              "restart": 0, "started": time.time(), "heartbeat": time.time(), **holder}
    (claim / ".lock").write_text(json.dumps(record))
    return claim / ".lock"


def test_waiting_too_long_names_the_builder_and_the_claim(tmp_path):
    output_dir = tmp_path / "corpus"
    lock = write_claim(output_dir)  # held by a live process: this one
    with pytest.raises(DataError, match="waited 0 s for process .* delete .*\\.lock") as err:
        build_once(output_dir, fake_build(output_dir, tmp_path / "log"), what="the default corpus",
                   timeout_s=0.2, poll_s=0.05, progress=False)
    assert str(lock) in str(err.value) and socket.gethostname() in str(err.value)
    assert not (tmp_path / "log").exists(), "nothing was built while the claim was held"


def test_a_dead_builders_claim_is_taken_over(tmp_path):
    output_dir, log = tmp_path / "corpus", tmp_path / "log"
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    write_claim(output_dir, pid=dead.pid)  # its process no longer exists
    build_once(output_dir, fake_build(output_dir, log, 0), what="the test corpus", timeout_s=5, poll_s=0.05,
               progress=False)
    assert len(log.read_text().splitlines()) == 1 and (output_dir / "manifest.json").exists()

"""megatrain.console: one place decides which rank prints and where."""

import io
import sys

from megatrain.console import log, setup_console


def test_rank_zero_prints_info_to_stdout_and_warnings_to_stderr(capsys, monkeypatch):
    setup_console()
    setup_console()  # idempotent: still one line per message
    monkeypatch.setenv("RANK", "0")
    log.info("hello")
    log.warning("careful")
    printed = capsys.readouterr()
    assert printed.out == "hello\n" and printed.err == "careful\n"


def test_other_ranks_print_only_what_is_meant_for_every_rank(capsys, monkeypatch):
    setup_console()
    monkeypatch.setenv("RANK", "3")
    log.info("rank 0's line")
    log.warning("rank 0's warning")
    log.info("every rank's line", extra={"all_ranks": True})
    printed = capsys.readouterr()
    assert printed.out == "every rank's line\n" and printed.err == ""


def test_lines_go_to_the_stream_of_the_moment(monkeypatch):
    setup_console()
    monkeypatch.setenv("RANK", "0")
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stdout", redirected)  # e.g. a SLURM job's log, set after import
    log.info("to the new stream")
    assert redirected.getvalue() == "to the new stream\n"

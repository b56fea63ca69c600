"""The command line as a whole: every flag documented, each command's arguments built only when it
runs (``data prepare`` and ``--help`` without torch), ``--version``."""

import argparse
import subprocess
import sys
from dataclasses import dataclass

import pytest

from megatrain import __version__
from megatrain.cli import COMMANDS, build_parser, main
from megatrain.cli_fields import add_field_arguments, field_values, option


def _flags(parser, path=("megatrain",)):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), action


def test_every_flag_of_every_command_has_help():
    undocumented = [f"{where} {action.option_strings or action.dest}"
                    for where, action in _flags(build_parser()) if not action.help]
    assert not undocumented, undocumented


def test_only_the_named_command_gets_its_arguments():
    parser = build_parser(["data", "prepare", "--help"])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    prepare = commands["data"]._actions[1].choices["prepare"]
    assert any("--input" in a.option_strings for a in prepare._actions)
    assert [a.dest for a in commands["eval"]._actions] == ["help"]  # not built


def test_data_prepare_and_help_do_not_import_torch():
    probe = ("import sys; from megatrain.cli import build_parser; "
             "build_parser(['data', 'prepare']); build_parser(['--help']); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    # control: a command that needs the model does import it
    probe = probe.replace("['data', 'prepare']", "['generate']")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"megatrain {__version__}"


@dataclass
class _Options:
    name: str
    count: int = option(3, "how many")
    ratio: float = option(0.5, "a fraction")
    label: str | None = option(None, "a label", flag="--tag")
    loud: bool = option(False, "say more")
    hidden: int = 7


def test_field_flags_take_the_fields_defaults_types_and_help():
    parser = argparse.ArgumentParser()
    names = ["count", "ratio", "label", "loud"]
    add_field_arguments(parser, _Options, names, dest_prefix="x_")
    assert _Options("a", **field_values(parser.parse_args([]), names, dest_prefix="x_")) == _Options("a")
    args = parser.parse_args(["--count", "5", "--ratio", "0.25", "--tag", "t", "--loud"])
    given = {"count": 5, "ratio": 0.25, "label": "t", "loud": True}
    assert field_values(args, names, dest_prefix="x_") == given
    assert "how many (default: 3)" in parser.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(ValueError, match="_Options.hidden has no help"):
        add_field_arguments(argparse.ArgumentParser(), _Options, ["hidden"])


@pytest.mark.parametrize("overrides, says", [
    (["model.mtp_kind=sequential", "model.head_type=linear"], "leave model.head_type=transformer"),
    (["model.mtp_kind=sequential", "model.n_future=40", "data.seq_len=32"],
     "data.seq_len=32 must be larger than model.n_future=40"),
    (["model.mtp_kind=sequential", "loss.mtp_lambda=-0.1"], "loss.mtp_lambda=-0.1 is out of range"),
], ids=["head_type", "depth", "lambda"])
def test_a_bad_sequential_config_is_one_line_and_exit_2_before_anything_is_written(overrides, says, tmp_path,
                                                                                    capsys):
    run = tmp_path / "run"
    assert main(["train", *overrides, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


@pytest.mark.parametrize("argv, expected", [([], 7), (["--executor", "slurm"], 1), (["--tasks", "3"], 3)])
def test_data_prepare_runs_one_task_per_usable_cpu_unless_told(argv, expected, monkeypatch, tmp_path):
    from megatrain.data_pipelines import prepare

    seen = {}
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, tasks, **k: seen.setdefault("tasks", tasks))
    monkeypatch.setattr("megatrain.machine.usable_cpus", lambda: 7)  # 7 CPUs; not 1, the old default
    args = build_parser(["data", "prepare"]).parse_args(
        ["data", "prepare", "--input", str(tmp_path), "--output", str(tmp_path / "out"), *argv])
    prepare.run_prepare(args)
    assert seen["tasks"] == expected


def test_data_prepare_without_tasks_resumes_an_unfinished_prepare_with_its_own_count(monkeypatch, tmp_path):
    import json

    from megatrain.data_pipelines import prepare

    seen = {}
    monkeypatch.setattr(prepare, "prepare_dataset", lambda *a, tasks, **k: seen.setdefault("tasks", tasks))
    monkeypatch.setattr("megatrain.machine.usable_cpus", lambda: 7)
    out = tmp_path / "out"
    out.mkdir()
    (out / prepare.IN_PROGRESS_MARKER).write_text(json.dumps({"tasks": 5, "config": {}}))
    argv = ["data", "prepare", "--input", str(tmp_path), "--output", str(out)]
    prepare.run_prepare(build_parser(["data", "prepare"]).parse_args(argv))
    assert seen.pop("tasks") == 5
    (out / prepare.IN_PROGRESS_MARKER).write_text("{torn")  # unreadable: the machine's default
    prepare.run_prepare(build_parser(["data", "prepare"]).parse_args(argv))
    assert seen.pop("tasks") == 7

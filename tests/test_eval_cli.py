"""``megatrain eval`` on a tiny trained run: heldout numbers equal the trainer's, humaneval end to
end, results files, ``--json``, and user errors.

What is protected: ``heldout`` reproduces the val_head_losses / val_head_accuracy the trainer logged
for each checkpoint's step (and the comparison tells two checkpoints apart: negative control);
``humaneval --limit 2`` generates, checks in the sandbox and writes eval/humaneval-STEP.json and its
completions; options stand before or after TASK; mistakes exit 2 with a message naming the flag.
"""

import json
from pathlib import Path

import pytest

from megatrain.cli import main
from megatrain.config import load_config
from tests.test_trainer import _overrides

STEPS = (3, 6)  # checkpoints, each validated by the trainer


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    from megatrain.trainer import train

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    train(load_config(None, _overrides(dataset, run_dir, **{"train.steps": STEPS[-1], "checkpoint.every": 3,
                                                            "train.eval_every": 3, "data.val_batches": 2,
                                                            "model.n_future": 2})))
    return run_dir


def _logged(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "val_head_losses" in r}


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("step", STEPS)
def test_heldout_equals_what_the_trainer_logged(run, capsys, step):
    logged = _logged(run)[step]
    result = _eval_json(capsys, "--run-dir", str(run), "--checkpoint", str(step), "heldout")
    assert result["checkpoint"] == step and len(result["head_losses"]) == 2
    assert result["head_losses"] == pytest.approx(logged["val_head_losses"], rel=1e-6, abs=1e-7)
    assert result["head_accuracy"] == pytest.approx(logged["val_head_accuracy"], abs=1e-9)
    saved = json.loads((run / "eval" / f"heldout-{step}.json").read_text())
    assert saved["head_losses"] == result["head_losses"]
    assert [row["perplexity"] for row in saved["table"]] == pytest.approx(
        [2.718281828459045 ** loss for loss in result["head_losses"]])


def test_heldout_comparison_tells_the_checkpoints_apart(run, capsys):
    """Negative control: the first checkpoint's numbers are not the last step's logged ones."""
    result = _eval_json(capsys, "--run-dir", str(run), "--checkpoint", str(STEPS[0]), "heldout")
    assert result["head_losses"] != pytest.approx(_logged(run)[STEPS[-1]]["val_head_losses"], rel=1e-4)


def test_heldout_every_window_and_options_after_the_task(run, dataset, capsys):
    result = _eval_json(capsys, "heldout", "--run-dir", str(run), "--data", str(dataset), "--batches", "0",
                        "--batch-size", "3", "--out", str(run / "all.json"))
    assert result["windows"] > 2 * 4  # more than the trainer's two batches of four
    assert json.loads((run / "all.json").read_text())["windows"] == result["windows"]


def test_heldout_of_the_export_equals_the_run_dirs(run, dataset, capsys, tmp_path):
    from megatrain.inference.export import export_run

    export = export_run(run, "meta", tmp_path / "meta").out
    from_run = _eval_json(capsys, "--run-dir", str(run), "heldout")
    from_export = _eval_json(capsys, "--from", str(export), "heldout", "--data", str(dataset),
                             "--seq-len", "32", "--batch-size", "4", "--batches", "2")
    assert from_export["head_losses"] == pytest.approx(from_run["head_losses"], rel=1e-6)
    assert (export / "eval" / "heldout-export.json").is_file()


def test_humaneval_end_to_end_writes_results_and_completions(run, capsys):
    assert main(["eval", "--run-dir", str(run), "humaneval", "--limit", "2", "--max-new-tokens", "12",
                 "--samples", "2", "--temperatures", "0.8", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "greedy" in printed and "t0.8" in printed and "pass@1" in printed
    results = json.loads((run / "eval" / f"humaneval-{STEPS[-1]}.json").read_text())
    assert results["checkpoint"] == STEPS[-1] and results["problems"] == 2
    assert set(results["modes"]) == {"greedy", "t0.8"}
    assert results["modes"]["t0.8"]["samples"] == 2 and "pass@1" in results["modes"]["t0.8"]
    assert results["decoding"]["speculative"] is True and results["decoding"]["new_tokens"] > 0
    records = [json.loads(line) for line in Path(results["completions_file"]).read_text().splitlines()]
    assert len(records) == 2 + 2 * 2
    assert {r["task_id"] for r in records} == {"HumanEval/0", "HumanEval/1"}
    assert all(isinstance(r["completion"], str) and r["outcome"] for r in records)


def test_humaneval_canonical_json_without_a_run(capsys, tmp_path):
    assert main(["eval", "humaneval", "--canonical", "--limit", "3", "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["modes"]["canonical"]["pass@1"] == 1.0
    assert result["table"] == [{"mode": "canonical", "problems": 3, "samples": 1, "pass@1": 1.0}]
    assert "not written" in printed.err and "--out" in printed.err  # says where nothing went
    out = tmp_path / "canonical.json"
    assert main(["eval", "humaneval", "--canonical", "--limit", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["modes"]["canonical"]["pass@1"] == 1.0
    assert "not written" not in capsys.readouterr().err
    assert "results_file" not in result  # nowhere to write it: printed only


@pytest.mark.parametrize("argv,match", [
    (["humaneval", "--limit", "1"], "--run-dir DIR .* or --from"),
    (["--run-dir", "R", "--from", "E", "heldout"], "not both"),
    (["--run-dir", "R", "--checkpoint", "99", "heldout"], "--checkpoint=99"),
    (["--run-dir", "R", "humaneval", "--samples", "2", "--temperatures", "0"], "temperatures must be > 0"),
    (["--run-dir", "R", "heldout", "--batch-size", "0"], "--batch-size=0"),
    (["--from", "R", "heldout", "--data", "R"], "needs --data and --seq-len"),
])
def test_mistakes_exit_2_naming_the_flag(run, capsys, argv, match):
    import re

    argv = [str(run) if a == "R" else a for a in argv]
    assert main(["eval", *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_synthetic_tasks_without_their_module_say_so(run, dataset, capsys, monkeypatch):
    import sys

    import megatrain.eval

    # as if the file were missing, also after another test imported it
    monkeypatch.delattr(megatrain.eval, "synthetic", raising=False)
    monkeypatch.setitem(sys.modules, "megatrain.eval.synthetic", None)
    assert main(["eval", "--run-dir", str(run), "induction", "--data", str(dataset)]) == 2
    assert "megatrain/eval/synthetic.py" in capsys.readouterr().err


def test_polynomial_task_runs_through_the_cli(tmp_path, capsys):
    """The wiring of a synthetic task: a run trained on `data synth` data, evaluated by name."""
    from megatrain.data.synth.cli import make_synth_dataset
    from megatrain.trainer import train

    data = tmp_path / "poly"
    make_synth_dataset("polynomial", data, examples=200, seed=1)
    run_dir = tmp_path / "run"
    train(load_config(None, _overrides(data, run_dir, **{"train.steps": 2, "checkpoint.every": 0,
                                                         "train.eval_every": 0, "data.seq_len": 64})))
    capsys.readouterr()  # the training's own output
    result = _eval_json(capsys, "--run-dir", str(run_dir), "polynomial", "--data", str(data))
    assert result["task"] == "polynomial" and result["checkpoint"] == 2 and result["table"]
    assert json.loads((run_dir / "eval" / "polynomial-2.json").read_text())["table"] == result["table"]
    # without --data: the run's own dataset, which its config names
    assert _eval_json(capsys, "--run-dir", str(run_dir), "polynomial")["table"] == result["table"]

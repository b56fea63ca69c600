"""End-to-end training on CPU: losses fall, bit-exact resume after a kill, bad input refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain.config import load_config
from megatrain.errors import ConfigError, DataError, NonFiniteLossError

REPO = Path(__file__).resolve().parent.parent

def _overrides(dataset, run_dir, **extra):
    base = {"data.path": str(dataset), "run.dir": str(run_dir), "model.n_layers": 4, "model.dim": 32,
            "model.n_heads": 2, "model.n_future": 2, "data.seq_len": 32, "train.batch_size": 4,
            "train.steps": 8, "train.warmup_steps": 2, "train.lr": 1e-2, "train.eval_every": 4,
            "data.val_batches": 1, "checkpoint.every": 3, "logging.progress": False,
            "logging.tensorboard": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def _train(overrides):
    from megatrain.trainer import train

    return train(load_config(None, overrides))


def test_losses_fall_and_run_dir_is_complete(dataset, tmp_path):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 30, "model.n_future": 3, "logging.tensorboard": True,
                                      "train.micro_batch_size": 2, "checkpoint.every": 10}))
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["head_losses"], records[-1]["head_losses"]
    assert len(first) == 3
    assert all(b < a - 0.5 for a, b in zip(first, last)), (first, last)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "head_accuracy"):
        assert key in records[-1]
    assert (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(evals) == 7 and len(evals[0]["val_head_losses"]) == 3


def _run_cli(args, kill_after_step=None):
    """``python -m megatrain ARGS``; SIGKILLed once ``kill_after_step`` is done, if set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = ["megatrain"] if kill_after_step is None else ["tests.kill_after_step", str(kill_after_step)]
    return subprocess.run([sys.executable, "-m", *entry, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def _final_weights(run_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(run_dir) / "checkpoints"
    latest = path / (path / "latest").read_text().strip()
    out = Path(run_dir) / "final.pt"
    dcp_to_torch_save(str(latest), str(out))
    return torch.load(out, weights_only=False)["model_optim"]


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["train", *_overrides(dataset, straight)]
    assert _run_cli(args).returncode == 0
    # Killed with SIGKILL right after step 5; the last checkpoint is step 3.
    result = _run_cli(["train", *_overrides(dataset, killed)], kill_after_step=5)
    assert result.returncode == -9, result.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    resumed = _run_cli(["train", *_overrides(dataset, killed)])  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["head_losses"] == rb["head_losses"], (ra, rb)
    wa, wb = _final_weights(straight), _final_weights(killed)
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name


def test_nan_loss_steps_are_not_applied_and_run_stops(dataset, tmp_path, monkeypatch):
    import megatrain.parallel.pipeline as pipeline

    real = pipeline.mtp_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), stats

    monkeypatch.setattr(pipeline, "mtp_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        _train(_overrides(dataset, run, **{"train.steps": 20, "checkpoint.every": 2}))
    records = _metrics(run)
    assert [r["skipped"] for r in records] == [False] * 4 + [True] * 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_vocab_smaller_than_tokenizer_is_refused(dataset, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        _train(_overrides(dataset, tmp_path / "run", **{"model.vocab_size": 100}))


def test_changed_model_in_existing_run_dir_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 3}))
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="different model"):
        _train(_overrides(dataset, run, **{"train.steps": 3, "model.dim": 64}))
    assert (run / "config.yaml").read_text() == before


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        _train(_overrides(tmp_path / "nothing", tmp_path / "run"))


def test_cli_reports_bad_key_and_exits_2(tmp_path):
    result = _run_cli(["train", "train.stepz=3", f"run.dir={tmp_path}/r"])
    assert result.returncode == 2
    assert "unknown config key 'train.stepz'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_embedded_default_trains_and_every_head_loss_falls(tmp_path, default_corpus_cache):
    """`megatrain train` with no config trains on the embedded stdlib corpus (built once per test
    session by the same ensure_default_dataset a first run calls)."""
    run = tmp_path / "run"
    result = _run_cli(["train", f"run.dir={run}", f"data.cache_dir={default_corpus_cache}",
                       "train.steps=40", "train.eval_every=0", "checkpoint.every=0",
                       "logging.progress=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(run)
    first = records[0]["head_losses"]
    last = [sum(r["head_losses"][i] for r in records[-5:]) / 5 for i in range(4)]
    assert len(first) == 4  # the default is n_future=4
    assert all(b < a - 1.0 for a, b in zip(first, last)), (first, last)
    assert "done: step 40" in result.stdout
    # it ends by showing the heads at work: a self-speculative greedy completion of a code prompt
    assert "sample (greedy, " in result.stdout and "tokens per forward with 4 heads" in result.stdout
    assert "def fibonacci(n):" in result.stdout


@pytest.mark.parametrize("overrides, weights", [
    ({"loss.extra_heads_weight": 0.25}, [1, 0.25, 0.25]),
    # an explicit list wins over extra_heads_weight
    ({"loss.extra_heads_weight": 0.25, "loss.head_weights": "[1,1,0.5]"}, [1, 1, 0.5]),
])
def test_training_loss_weighs_the_heads_as_configured(dataset, tmp_path, capsys, overrides, weights):
    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"model.n_future": 3, "train.steps": 2, "train.eval_every": 0,
                                       "checkpoint.every": 0}, **overrides))
    for record in _metrics(run):
        heads = record["head_losses"]
        assert record["loss"] == pytest.approx(sum(w * x for w, x in zip(weights, heads)), rel=1e-5)
        # control: the weights are not a no-op (the unweighted sum differs)
        assert abs(record["loss"] - sum(heads)) > 0.1
    assert f"loss weights per head {' '.join(f'{w:g}' for w in weights)}" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(dataset, tmp_path):
    """train.compile=true compiles every block in place: same names, same losses (fp32)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    # equal head weights: a 0.03-weighted head's gradients are tiny, and AdamW turns inductor's
    # reordering of them into relative differences of 1e-2 in single weights
    settings = {"train.steps": 3, "train.eval_every": 0, "checkpoint.every": 0,
                "model.head_type": "causal", "loss.extra_heads_weight": 1.0}
    _train(_overrides(dataset, eager, **settings))
    _train(_overrides(dataset, compiled, **settings, **{"train.compile": True}))
    for a, b in zip(_metrics(eager), _metrics(compiled)):
        for x, y in zip(a["head_losses"], b["head_losses"]):
            assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    wa, wb = _final_weights(eager), _final_weights(compiled)
    assert wa["model"].keys() == wb["model"].keys()
    for name, tensor in wa["model"].items():
        # AdamW normalises tiny gradients, amplifying inductor's fp32 reordering; a wrong
        # gradient would show at the lr scale (1e-2)
        torch.testing.assert_close(wb["model"][name], tensor, rtol=1e-4, atol=1e-5)


def test_end_of_run_sample_is_a_code_completion_and_skipped_for_synthetic_tasks(dataset, tmp_path, capsys):
    """The sample `megatrain train` prints after a single-process run completes a code prompt; on a
    synthetic task's vocabulary (names, polynomial symbols) that prompt means nothing: no sample."""
    from megatrain.data.synth.cli import make_synth_dataset
    from megatrain.inference.generate_cli import SAMPLE_PROMPT, print_sample

    quick = {"train.steps": 1, "train.eval_every": 0, "checkpoint.every": 0}
    code_run = tmp_path / "code"
    _train(_overrides(dataset, code_run, **quick))
    capsys.readouterr()
    print_sample(code_run, max_new_tokens=4)
    assert f"tokens per forward with 2 heads):\n{SAMPLE_PROMPT}" in capsys.readouterr().out  # control
    synth = tmp_path / "induction"
    make_synth_dataset("induction", synth, examples=50, seed=0)
    synth_run = tmp_path / "synth"
    _train(_overrides(synth, synth_run, **quick))
    capsys.readouterr()
    print_sample(synth_run, max_new_tokens=4)
    assert capsys.readouterr().out == ""


def test_a_run_started_before_extra_heads_weight_resumes_with_the_unweighted_sum(dataset, tmp_path, capsys):
    """Its config.yaml has no loss.extra_heads_weight: it summed its heads' losses unweighted, and
    resuming it under the new default must not change its loss mid-run."""
    import yaml

    run = tmp_path / "run"
    settings = {"model.n_future": 3, "train.eval_every": 0, "checkpoint.every": 2}
    _train(_overrides(dataset, run, **settings, **{"train.steps": 2}))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["loss"]["extra_heads_weight"]  # as an older megatrain wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    _train(_overrides(dataset, run, **settings, **{"train.steps": 4}))
    assert "continues so (loss.extra_heads_weight=1)" in capsys.readouterr().out
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records[:2]:  # control: this run's first steps used the default weights
        assert abs(r["loss"] - sum(r["head_losses"])) > 0.1
    for r in records[2:]:
        assert r["loss"] == pytest.approx(sum(r["head_losses"]), rel=1e-5)


def test_a_scheduled_mtp_lambda_change_applies_from_its_step_and_is_recorded(dataset, tmp_path):
    """loss.mtp_lambda_step: the depths' weight changes at that step (the total loss with it) and
    config_history.jsonl says so; the control run without the switch keeps its weight."""
    common = {"train.steps": 4, "model.mtp_kind": "sequential", "model.n_layers": 2, "model.n_future": 3,
              "train.eval_every": 0, "checkpoint.every": 0, "loss.mtp_lambda": 0.3,
              "loss.mtp_lambda_after": 0.0}
    switched, control = tmp_path / "switched", tmp_path / "control"
    _train(_overrides(dataset, switched, **common, **{"loss.mtp_lambda_step": 3}))
    _train(_overrides(dataset, control, **common))
    history = [json.loads(line) for line in (switched / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 3, "time": history[0]["time"],
                        "changes": {"loss.mtp_lambda (scheduled)": [0.3, 0.0]}}]
    assert not (control / "config_history.jsonl").exists()
    a, b = _metrics(switched), _metrics(control)
    assert [r["loss"] for r in a[:3]] == [r["loss"] for r in b[:3]]  # the same steps before it
    last = a[3]  # step 4 ran with weight 0 on the depths: the total is head 1's loss alone
    assert abs(last["loss"] - last["head_losses"][0]) < 1e-5 < abs(b[3]["loss"] - b[3]["head_losses"][0])

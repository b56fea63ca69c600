"""The experiments' plumbing (megatrain/experiments/), without training: arms reach the trainer
with parameter-matched configs, results land in the markdown table (the verdicts are tested in
test_experiment_intervals.py; the experiments themselves are not part of the suite)."""

from dataclasses import replace

import pytest

from megatrain.data.synth.dataset import read_documents
from megatrain.data.synth.polynomial import Settings
from megatrain.errors import UserError
from megatrain.experiments import __main__ as experiments_main
from megatrain.experiments import code, finetune, induction, polynomial
from megatrain.experiments.common import Arm, train_runs


def test_a_quick_run_trains_each_arm_and_appends_its_table(tmp_path, monkeypatch):
    trained = []

    def fake_train(run_dir, overrides):
        trained.append((run_dir.name, overrides))
        return run_dir

    def fake_eval(run_dir, step, evaluate, dataset, batch_size=64):
        n = int(run_dir.name[1])  # n1_seed0, n2_w0_seed0 ...
        lower = 0.05 if "_w0" in run_dir.name else 0.0  # the control: below its n=2
        table = [{"operations": k, "distribution": "in" if k <= 5 else "out", "exact_match": n / 10,
                  "coefficient_accuracy": 0.5 - n / 100, "examples": 10} for k in range(1, 9)]
        return {"table": table, "in_distribution_accuracy": n / 10 - lower,
                "out_of_distribution_accuracy": n / 20 - lower,
                "in_distribution_coefficient_accuracy": 0.5 - n / 100,
                "out_of_distribution_coefficient_accuracy": 0.5 - n / 100}

    def fake_train_runs(specs, jobs=1):
        return [fake_train(run_dir, overrides) for run_dir, overrides in specs]

    monkeypatch.setattr(polynomial, "train_runs", fake_train_runs)
    monkeypatch.setattr(polynomial, "evaluate_run", fake_eval)
    results = tmp_path / "results.md"
    assert experiments_main.main(["polynomial", "--quick", "--seeds", "0", "1", "--examples", "20",
                                  "--work-dir", str(tmp_path), "--results", str(results)]) == 0
    assert sorted(name for name, _ in trained) == sorted(f"{arm}_seed{s}" for arm in ("n1", "n2", "n2_w0")
                                                         for s in (0, 1))
    weights = {name: o["loss.extra_heads_weight"] for name, o in trained}
    assert weights["n2_w0_seed0"] == 0.0 and weights["n2_seed0"] == 1.0
    n_layers = {o["model.n_layers"] for _, o in trained}
    assert n_layers == {polynomial.QUICK.model["model.n_layers"]}  # equal parameters: same n_layers
    text = results.read_text()
    assert text.startswith("# Results")
    # the quick ring has one coefficient per answer: exact match is the only measure
    assert "| all | out | 0.050 ± 0.000 | 0.100 ± 0.000 | 0.050 ± 0.000 |\n" in text
    # two seeds, however consistent, are no finding (the sign-flip test's smallest p is 0.5)
    assert "n=2 above n=1, out distribution, exact match: not shown: +0.050" in text
    assert ("n=2 above its control (head 2 unweighted), out distribution, exact match: "
            "not shown: +0.050") in text
    assert "coefficients" not in text
    assert "20 training documents (version 2, degree 1, train_ops 1-1, val_ops 1-2)" in text
    assert "validation documents posing a problem that a training document poses: 0 of " in text
    # the paper's ring (the full variant's) adds the share of answer coefficients right
    paper_ring = replace(polynomial.QUICK, seeds=(0, 1), ring=Settings())
    dataset = next(tmp_path.glob("polynomial-quick-*/data_polynomial"))
    outcome = polynomial.run(paper_ring, (Arm(1), Arm(2), Arm(4)), dataset, tmp_path / "paper")
    assert outcome["header"][-1] == "n=4 coefficients"
    assert outcome["rows"][-1] == ["all", "out", "0.050 ± 0.000", "0.100 ± 0.000", "0.200 ± 0.000",
                                   "0.490 ± 0.000", "0.480 ± 0.000", "0.460 ± 0.000"]
    assert any(note.startswith("n=4 above n=1, out distribution, coefficients: not shown: -0.030")
               for note in outcome["notes"]), outcome["notes"]


def test_finetune_arms_keep_their_source_trunk_and_the_control_has_the_n1_prime_depth():
    sizes = finetune.QUICK
    n_layers = sizes.model["model.n_layers"]

    def layers_and_heads(model):
        return model["model.n_layers"], model["model.n_future"]

    # n=4 → n'=1: the n=4 model's trunk and head 1
    assert layers_and_heads(finetune._finetune_model(sizes, "n=4 → n'=1")) == (n_layers - 3, 1)
    assert layers_and_heads(finetune._finetune_model(sizes, "n=4 → n'=4")) == (n_layers, 4)
    assert layers_and_heads(finetune._finetune_model(sizes, finetune.BASELINE)) == (n_layers, 1)
    # the control is pretrained and finetuned at the depth of the n'=1 finetuning: same shape
    control = finetune._finetune_model(sizes, finetune.CONTROL)
    assert layers_and_heads(control) == (n_layers - 3, 1)
    assert finetune._pretrain_model(sizes, "n1_shallow") == control
    assert finetune._slug(finetune.CONTROL) == "1shallow_to1" and finetune._slug("n=4 → n'=1") == "4to1"


def test_runs_trained_in_parallel_processes_equal_runs_trained_in_turn(dataset, tmp_path):
    """``--jobs 2`` trains in spawned processes; each run is the run it would be on its own."""
    import json

    def spec(root, seed):
        return (root / f"seed{seed}", {
            "data.path": str(dataset), "model.n_layers": 3, "model.n_future": 2, "model.dim": 32,
            "model.n_heads": 2, "data.seq_len": 32, "train.batch_size": 4, "train.steps": 3,
            "train.seed": seed, "checkpoint.every": 0, "train.warmup_steps": 1})

    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["head_losses"] for line in lines if '"loss"' in line]

    in_turn = train_runs([spec(tmp_path / "a", 0), spec(tmp_path / "a", 1)], jobs=1)
    at_once = train_runs([spec(tmp_path / "b", 0), spec(tmp_path / "b", 1)], jobs=2)
    assert [d.name for d in at_once] == ["seed0", "seed1"]
    for a, b in zip(in_turn, at_once):
        assert losses(a) == losses(b) and len(losses(a)) == 3
    assert losses(in_turn[0]) != losses(in_turn[1])  # control: the seeds differ, so equality means something


def test_each_finetuning_starts_from_the_pretraining_of_its_seed_and_source(tmp_path, monkeypatch):
    """Pretraining on one task, finetuning on another (its own dataset, made by the experiment):
    every finetuning starts from its seed's pretraining of its source, the control from the
    depth-matched n=1 model, and the table compares the n=4 arms with the baseline and the control."""
    from megatrain.data.synth.cli import make_synth_dataset
    from megatrain.data.synth.dataset import synth_settings

    batches = []
    accuracy = {"pretrain": 0.1, "1to1": 0.2, "4to1": 0.5, "4to4": 0.4, "1shallow_to1": 0.3}

    def fake_train_runs(specs, jobs=1):
        batches.append(list(specs))
        return [run_dir for run_dir, _ in specs]

    def fake_eval(run_dir, step, evaluate, dataset, batch_size=64):
        assert dataset.name == "data_finetune"  # every model is measured on the finetuning task
        kind, seed = run_dir.name.split("_", 1)[0], int(run_dir.name.rsplit("seed", 1)[1])
        value = accuracy[kind if kind == "pretrain" else run_dir.name.split("_", 1)[1].rsplit("_seed", 1)[0]]
        return {"in_distribution_accuracy": value + seed / 100, "out_of_distribution_accuracy": value / 2,
                "in_distribution_coefficient_accuracy": 0.2, "out_of_distribution_coefficient_accuracy": 0.1}

    monkeypatch.setattr(finetune, "train_runs", fake_train_runs)
    monkeypatch.setattr(finetune, "evaluate_run", fake_eval)
    sizes = replace(finetune.QUICK, examples=60)
    pretraining_data = tmp_path / "data"
    make_synth_dataset("polynomial", pretraining_data, sizes.examples, ring=sizes.ring)
    outcome = finetune.run(sizes, finetune.QUICK_ARMS, pretraining_data, tmp_path, jobs=2)
    assert synth_settings(tmp_path / "data_finetune", "polynomial")["degree"] == 1 != sizes.ring.degree
    assert [row[0] for row in outcome["rows"]] == [
        "n=1 pretrained", "n=4 pretrained", "n=1 depth-matched pretrained", *finetune.QUICK_ARMS]
    pretrainings, finetunings = batches
    assert sorted(d.name for d, _ in pretrainings) == sorted(
        f"pretrain_{name}_seed{s}" for name in ("n1", "n4", "n1_shallow") for s in sizes.seeds)
    assert {o["data.path"] for _, o in pretrainings} == {pretraining_data}
    assert {o["data.path"] for _, o in finetunings} == {tmp_path / "data_finetune"}
    assert len(finetunings) == len(sizes.seeds) * len(finetune.QUICK_ARMS)
    source_of = {"1to1": "n1", "4to1": "n4", "4to4": "n4", "1shallow_to1": "n1_shallow"}
    for run_dir, overrides in finetunings:  # finetune_4to1_seed0 <- pretrain_n4_seed0
        arm, seed = run_dir.name.split("_", 1)[1].rsplit("_seed", 1)
        assert overrides["init.path"] == tmp_path / f"pretrain_{source_of[arm]}_seed{seed}", run_dir.name
        assert overrides["train.seed"] == int(seed)
    notes = outcome["notes"]
    assert any(n.startswith("n=4 → n'=1 above n=1 → n'=1, in: yes: +0.300") for n in notes), notes
    control = "above the control (n=1 at its depth), in: yes:"
    assert any(n.startswith(f"n=4 → n'=1 {control} +0.200") for n in notes), notes
    assert any(n.startswith(f"n=4 → n'=4 {control} +0.100") for n in notes), notes
    assert not any(n.startswith("n=1 depth-matched") for n in notes)  # the control is compared against
    overlap = next(n for n in notes if n.startswith("finetuning validation documents"))
    assert overlap.startswith("finetuning validation documents posing a problem that a finetuning training "
                              "document poses: 0 of ")
    # every F_7 problem is the constant terms of some F_7[X]/(X^2) problem: with 60 pretraining
    # documents some are carried, not all (the count is made, not assumed)
    carried = int(overlap.split("lower coefficients: ")[1].split(" of ")[0])
    assert 0 < carried < len(read_documents(tmp_path / "data_finetune", "val"))


def test_code_compares_n2_with_n1_and_its_control_on_head_1_loss(tmp_path, monkeypatch, dataset):
    """The quick code arms keep a 4-layer trunk (n=2 of 6 layers), each multi-token arm is paired by
    seed with n=1 and with its control, and the held-out split's overlap with training is counted
    from the run's own dataset."""
    from megatrain.config import load_config
    from megatrain.run_dir import RunDir

    trained = []
    loss = {"n1": 3.0, "n2": 3.2, "n2_w0": 3.1}  # fake: n=2 worse than both, as the paper at small sizes

    def fake_train_runs(specs, jobs=1):
        for run_dir, overrides in specs:
            trained.append((run_dir.name, overrides))
            RunDir(run_dir).path.mkdir(parents=True)
            RunDir(run_dir).write_config(load_config(None, [f"data.path={dataset}"]))
        return [run_dir for run_dir, _ in specs]

    def fake_eval(run_dir, task, *options, shared=False):
        arm, seed = run_dir.name.rsplit("_seed", 1)
        if task == "heldout":
            n = 1 if arm == "n1" else 2
            return {"head_losses": [loss[arm] + int(seed) / 100] + [4.0] * (n - 1)}
        return {"modes": {"greedy": {"pass@1": 0.0}}, "decoding": {"tokens_per_forward": 1.0}}

    monkeypatch.setattr(code, "train_runs", fake_train_runs)
    monkeypatch.setattr(code, "megatrain_eval", fake_eval)
    outcome = code.run(code.QUICK, code.QUICK_ARMS, None, tmp_path, jobs=2)
    by_name = dict(trained)
    assert sorted(by_name) == sorted(f"{a}_seed{s}" for a in loss for s in code.QUICK.seeds)
    assert by_name["n2_w0_seed0"]["loss.extra_heads_weight"] == 0.0
    layers = code.QUICK.model["model.n_layers"]
    assert layers - max(arm.n_future for arm in code.QUICK_ARMS) >= 4  # the multi-token trunk's depth
    assert outcome["header"] == ["metric", "n=1", "n=2", "n=2 weight 0 (control)"]
    notes = outcome["notes"]
    assert notes[0].startswith("n=2 head-1 held-out loss below n=1's: no, the opposite: -0.200"), notes
    assert notes[1].startswith("n=2 head-1 held-out loss below its control (the same model, heads 2..n "
                               "unweighted)'s: no, the opposite: -0.100"), notes
    assert notes[2].startswith("n=2 weight 0 (control) head-1 held-out loss below n=1's: no, the opposite: "
                               "-0.100"), notes  # the architecture alone, against n=1
    val = len(read_documents(dataset, "val"))
    assert notes[3] == f"held-out documents also in the training split: 0 of {val}"
    # the count is made from the run's dataset: a validation document planted in training is found
    from megatrain.data.synth import dataset as synth_dataset

    planted = {"train": [[5, 6, 7], [8]], "val": [[8], [9]]}
    monkeypatch.setattr(synth_dataset, "read_documents", lambda folder, split: planted[split])
    assert code._shared_with_training(tmp_path / "n1_seed0") == "1 of 2"


def test_code_pairs_losses_by_seed_when_an_evaluation_failed(tmp_path, monkeypatch):
    def fake_train_runs(specs, jobs=1):
        return [run_dir for run_dir, _ in specs]

    def fake_eval(run_dir, task, *options, shared=False):
        arm, seed = run_dir.name.rsplit("_seed", 1)
        if task == "heldout" and arm == "n1" and seed == "0":
            return {"error": "failed"}
        if task == "heldout":  # n=2 is worse by 0.1 at every seed but seed 0's 9.0
            worse = 9.0 if seed == "0" else 0.1
            return {"head_losses": [int(seed) + (worse if arm == "n2" else 0.0), 4.0]}
        return {"modes": {"greedy": {"pass@1": 0.0}}, "decoding": {"tokens_per_forward": 1.0}}

    monkeypatch.setattr(code, "train_runs", fake_train_runs)
    monkeypatch.setattr(code, "megatrain_eval", fake_eval)
    monkeypatch.setattr(code, "_shared_with_training", lambda run_dir: "0 of 1")
    sizes = replace(code.QUICK, seeds=(0, 1, 2, 3))
    notes = code.run(sizes, (Arm(1), Arm(2)), None, tmp_path)["notes"]
    # seed 0 left out of the pair, not shifted onto seed 1: the difference is exactly -0.1
    assert notes[0].startswith("n=2 head-1 held-out loss below n=1's: not shown: -0.100, 90% interval "
                               "[-0.100, -0.100] over 3 seeds"), notes
    assert notes[0].endswith("(seeds [1, 2, 3]: the others failed)"), notes
    assert any("heldout n=1 seed 0: failed" in n for n in notes)


def test_induction_compares_n2_with_n1_and_with_its_loss_control_seed_by_seed(tmp_path, monkeypatch):
    """Arms n=1, n=2 and n=2 with head 2 unweighted, cross-document masking on, every verdict
    paired by seed, and the test split's overlap with training reported."""
    trained = []
    gain = {"n1": 0.0, "n2": 0.3, "n2_w0": 0.05}  # fake accuracies: n=2 well above both others

    def fake_train_runs(specs, jobs=1):
        trained.extend((run_dir.name, overrides) for run_dir, overrides in specs)
        return [run_dir for run_dir, _ in specs]

    def fake_eval(run_dir, step, evaluate, dataset, batch_size=64):
        arm, seed = run_dir.name.rsplit("_seed", 1)
        return {"accuracy": 0.1 + gain[arm] + 0.01 * int(seed) + step / 1e5}

    monkeypatch.setattr(induction, "train_runs", fake_train_runs)
    monkeypatch.setattr(induction, "evaluate_run", fake_eval)
    results = tmp_path / "results.md"
    assert experiments_main.main(["induction", "--quick", "--steps", "500", "--examples", "30",
                                  "--work-dir", str(tmp_path), "--results", str(results)]) == 0
    by_name = dict(trained)
    assert sorted(by_name) == sorted(f"{a}_seed{s}" for a in gain for s in range(5))
    assert by_name["n2_w0_seed0"]["loss.extra_heads_weight"] == 0.0
    assert by_name["n2_seed0"]["loss.extra_heads_weight"] == 1.0
    assert by_name["n2_seed0"]["model.n_future"] == 2
    assert {o["model.n_layers"] for o in by_name.values()} == {induction.QUICK.model["model.n_layers"]}
    text = results.read_text()
    assert "| step | n=1 | n=2 | n=2 weight 0 (control) |" in text
    assert "- n=2 above n=1 at step 500: yes: +0.300" in text
    assert "- n=2 above its control (the same model, head 2 unweighted) at step 500: yes: +0.250" in text
    assert "- test documents also in the training split: 0 of 200" in text


def test_induction_formation_row_gives_each_seeds_first_step_at_twice_chance():
    steps = [250, 500, 750]
    by_step = {250: [0.04, 0.09, 0.04], 500: [0.05, 0.20, 0.04], 750: [0.10, 0.30, 0.05]}
    assert induction.FORMED == 2 / 24
    assert induction._formation(by_step, steps) == "750 / 250 / —"


@pytest.mark.parametrize("experiment", [induction, polynomial, finetune])
def test_every_variant_gives_its_models_the_positions_of_its_longest_document(experiment):
    for sizes in (experiment.QUICK, experiment.FULL):
        experiments_main._check_documents_fit(experiment.TASK, sizes)
    # negative control: a variant whose sequences are too short is refused before any training
    short = replace(experiment.QUICK, train={**experiment.QUICK.train, "data.seq_len": 4})
    with pytest.raises(UserError, match="raise data.seq_len .* to at least"):
        experiments_main._check_documents_fit(experiment.TASK, short)


def test_a_new_table_goes_above_the_appendix_of_superseded_ones(tmp_path):
    from megatrain.experiments.common import APPENDIX_HEADING, RESULTS_HEADING, append_results

    path = tmp_path / "results.md"
    append_results("first", "s", ["a"], [["1"]], "p", [], 60, path)  # a new file: heading, table
    assert path.read_text().startswith(RESULTS_HEADING) and "### first" in path.read_text()
    path.write_text(path.read_text() + f"\n{APPENDIX_HEADING}\n\n### old — 2026-12-01\n")
    append_results("second", "s", ["a"], [["2"]], "p", ["a note"], 60, path)
    text = path.read_text()
    assert text.index("### first") < text.index("### second") < text.index(APPENDIX_HEADING) \
        < text.index("### old")
    assert text.count(APPENDIX_HEADING) == 1 and "- a note" in text

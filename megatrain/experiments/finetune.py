"""Finetuning multi-token predictors (paper §3.6): is an n=4 model a better start for a next-token
finetuning on another task than an n=1 model?

The paper pretrains on code and finetunes on CodeContests. Here both tasks come from the polynomial
generator, which gives every ring the same vocabulary (so weights carry over), but they are
different tasks. In the quick variant pretraining is arithmetic in F_7[X]/(X^2) with one or two
operations (the runner's dataset, ``sizes.ring``), finetuning is arithmetic in F_7 (integers mod 7),
one operation in training and two out of distribution (the full variant: F_7[X]/(X^5), then
F_7[X]/(X^2)), on a dataset of its own whose test problems are held out of
its training documents (``options["finetune_ring"]``). What pretraining can pass on: F_7[X]/(X^2)'s
constant coefficient follows the rules of F_7 (for + - and *), learnt there from 49x more problems
than F_7's 147.

Arms, each finetuned with a fresh optimizer at a lower learning rate, all with cross-document
masking (RUN_DEFAULTS):
- ``n=1 → n'=1``: the parameter-matched next-token model (L layers), the paper's baseline;
- ``n=4 → n'=1``: the n=4 model's trunk and head 1 (L - 3 layers), as in the paper;
- ``n=4 → n'=4``: the whole n=4 model, finetuned with its four heads;
- ``n=1 depth-matched → n'=1``, the control: an n=1 model of L - 3 layers, the depth of the n'=1
  finetuning, pretrained and finetuned at that depth. It has the shapes of the n=4 model's trunk and
  head 1, so ``n=4 → n'=1`` against it differs in the pretraining loss and not in depth; not exactly
  in the loss alone, as an n=4 model with heads 2..4 unweighted would (the initial scale of the
  output projections follows the model's depth, 1/sqrt(2 x layers), so it starts √2 larger here).
  Against ``n=1 → n'=1`` the n'=1 model also has 3 layers fewer (the paper's 7B: 29 against 32).

Test data: the finetuning test problems are held out of the finetuning training documents. The
pretraining documents do carry them, by design: the constant terms of every F_7[X]/(X^2) problem
are an F_7 problem (truncation is a ring homomorphism), and with both X coefficients 0 it is that
problem written in the larger ring; the table counts both.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.data.synth.dataset import read_documents
from megatrain.data.synth.polynomial import Settings, problem_of, problems_shared, projected_problem
from megatrain.eval.synthetic import DISTRIBUTION, evaluate_polynomial
from megatrain.experiments.common import Sizes, cell, evaluate_run, train_runs
from megatrain.experiments.intervals import verdict
from megatrain.experiments.polynomial import QUICK_RING, metric, scores_coefficients
from megatrain.model.layout import LayerLayout

TASK = "polynomial"  # the pretraining task; the finetuning task's dataset is made by run()
PRETRAIN_RING = Settings(degree=2, train_ops=(1, 2), val_ops=(1, 2))
# 5 seeds x (3 pretrainings + 4 finetunings), two runs at a time
QUICK = Sizes(examples=20_000, steps=1000, seeds=(0, 1, 2, 3, 4), ring=PRETRAIN_RING,
              options={"finetune_ring": QUICK_RING},
              model={"model.n_layers": 6, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 64, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 50})
FULL = Sizes(examples=200_000, steps=4000, seeds=(0, 1, 2, 3, 4), ring=Settings(),
             options={"finetune_ring": Settings(degree=2, train_ops=(1, 3), val_ops=(1, 5))},
             model={"model.n_layers": 8, "model.dim": 256, "model.n_heads": 8},
             train={"data.seq_len": 64, "train.batch_size": 64, "train.lr": 1e-3, "train.warmup_steps": 200})
FINETUNE_STEPS_FRACTION = 0.5  # finetuning steps, as a fraction of pretraining's
FINETUNE_LR_FRACTION = 0.3
BASELINE, CONTROL = "n=1 → n'=1", "n=1 depth-matched → n'=1"
QUICK_ARMS = FULL_ARMS = (BASELINE, "n=4 → n'=1", "n=4 → n'=4", CONTROL)
# the pretrainings the arms start from: name -> (n_future, layers: "all" or "n=4's n'=1 depth")
PRETRAININGS = {"n1": (1, "all"), "n4": (4, "all"), "n1_shallow": (1, "shallow")}
SOURCE_OF = {BASELINE: "n1", "n=4 → n'=1": "n4", "n=4 → n'=4": "n4", CONTROL: "n1_shallow"}
PRETRAINED_ROW = {"n1": "n=1 pretrained", "n4": "n=4 pretrained",
                  "n1_shallow": "n=1 depth-matched pretrained"}
PAPER = ("both finetunings of the n=4 model beat the n=1 model (CodeContests pass@k, §3.6); finetuning "
         "with n'=1 was not worse than with n'=4")


def cost(sizes: Sizes, arms: tuple[str, ...]) -> str:
    per_seed = f"{len(PRETRAININGS)} pretrainings of {sizes.steps} steps + {len(arms)} finetunings of " \
               f"{finetune_steps(sizes)} steps"
    return f"{len(sizes.seeds)} seeds × ({per_seed})"


def finetune_steps(sizes: Sizes) -> int:
    return max(1, int(sizes.steps * FINETUNE_STEPS_FRACTION))


def shallow_layers(sizes: Sizes) -> int:
    """Layers of the n=4 model's trunk + head 1: the n'=1 finetuning's depth."""
    from megatrain.config import ModelConfig

    n_layers = sizes.model["model.n_layers"]
    return LayerLayout.of(ModelConfig(n_layers=n_layers, n_future=4)).n_trunk_layers + 1


def _pretrain_model(sizes: Sizes, name: str) -> dict:
    n_future, depth = PRETRAININGS[name]
    layers = sizes.model["model.n_layers"] if depth == "all" else shallow_layers(sizes)
    return {**sizes.model, "model.n_layers": layers, "model.n_future": n_future}


def _finetune_model(sizes: Sizes, arm: str) -> dict:
    """The model.* keys of a finetuning arm: its source's trunk with n' heads."""
    source = _pretrain_model(sizes, SOURCE_OF[arm])
    target_n = int(arm.rsplit("n'=", 1)[1])
    if target_n == source["model.n_future"]:
        return source
    return {**source, "model.n_layers": shallow_layers(sizes), "model.n_future": target_n}


def run(sizes: Sizes, arms: tuple[str, ...], dataset: Path, work: Path, jobs: int = 1) -> dict:
    from megatrain.data.synth.cli import make_synth_dataset

    ring, pretrain_ring = sizes.options["finetune_ring"], sizes.ring or Settings()
    finetune_data = work / "data_finetune"  # work is new for every experiment run
    make_synth_dataset(TASK, finetune_data, sizes.examples, seed=0, ring=ring)
    # the pretrained models are measured on the finetuning task too: what each finetuning started from
    sources = [name for name in PRETRAININGS if name in {SOURCE_OF[arm] for arm in arms}]
    rows_of = [PRETRAINED_ROW[name] for name in sources] + list(arms)
    results: dict[str, dict[str, list]] = {row: {"in": [], "out": [], "in coefficients": [],
                                                  "out coefficients": []} for row in rows_of}

    def common(seed: int) -> dict:
        return {**sizes.train, "train.seed": seed, "checkpoint.every": 0}

    def measure(row: str, run_dir: Path) -> None:
        result = evaluate_run(run_dir, None, evaluate_polynomial, finetune_data, batch_size=128)
        for kind in ("in", "out"):
            results[row][kind].append(result[DISTRIBUTION[kind] + "_accuracy"])
            results[row][f"{kind} coefficients"].append(result[DISTRIBUTION[kind] + "_coefficient_accuracy"])

    pretrainings = [(seed, name) for seed in sizes.seeds for name in sources]
    pretrained = dict(zip(pretrainings, train_runs([(work / f"pretrain_{name}_seed{seed}", {
        **common(seed), **_pretrain_model(sizes, name), "data.path": dataset, "train.steps": sizes.steps})
        for seed, name in pretrainings], jobs)))
    for (_, name), run_dir in pretrained.items():
        measure(PRETRAINED_ROW[name], run_dir)
    finetunings = [(seed, arm) for seed in sizes.seeds for arm in arms]
    specs = [(work / f"finetune_{_slug(arm)}_seed{seed}", {
        **common(seed), **_finetune_model(sizes, arm), "data.path": finetune_data,
        "train.steps": finetune_steps(sizes), "train.lr": sizes.train["train.lr"] * FINETUNE_LR_FRACTION,
        "init.path": pretrained[seed, SOURCE_OF[arm]]}) for seed, arm in finetunings]
    for (_, arm), run_dir in zip(finetunings, train_runs(specs, jobs)):
        measure(arm, run_dir)
    measures = ("in", "out") + (("in coefficients", "out coefficients") if scores_coefficients(ring) else ())
    names = {"in": "exact match in distribution", "out": "exact match out of distribution",
             "in coefficients": "coefficients right in distribution",
             "out coefficients": "coefficients right out of distribution"}
    header = ["arm", *(names[key] for key in measures)]
    rows = [[row, *(cell(results[row][key]) for key in measures)] for row in rows_of]
    notes = []
    for arm in arms:
        others = [other for other in (BASELINE, CONTROL) if other in arms and other != arm]
        if arm == CONTROL or not arm.startswith("n=4"):
            continue
        for other in others:
            against = "the control (n=1 at its depth)" if other == CONTROL else other
            for kind in measures:
                difference = verdict(results[arm][kind], results[other][kind])
                notes.append(f"{arm} above {against}, {kind}: {difference}")
    splits = (("pretraining", dataset, "train"), ("train", finetune_data, "train"),
              ("test", finetune_data, "val"))
    listed = {name: [[int(t) for t in doc] for doc in read_documents(folder, split)]
              for name, folder, split in splits}
    notes.append(f"finetuning validation documents posing a problem that a finetuning training document "
                 f"poses: {problems_shared(listed['train'], listed['test'])} of {len(listed['test'])}; "
                 + _pretraining_overlap(listed["pretraining"], listed["test"], pretrain_ring, ring))
    notes.append(f"pretraining {sizes.steps} steps on {pretrain_ring.ring}, "
                 f"finetuning {finetune_steps(sizes)} steps on {ring.ring} at {FINETUNE_LR_FRACTION}× the "
                 f"learning rate, fresh optimizer; the pretrained rows are the models the finetunings "
                 f"started from, measured on the finetuning task; the n'=1 models and the control have "
                 f"{shallow_layers(sizes)} layers, n=1 → n'=1 and n=4 → n'=4 have "
                 f"{sizes.model['model.n_layers']}")
    return {"header": header, "rows": rows, "paper": PAPER, "notes": notes,
            "metric": metric(ring, " after finetuning")}


def _pretraining_overlap(pretraining: list[list[int]], test: list[list[int]], pretrain_ring: Settings,
                         ring: Settings) -> str:
    """How many finetuning test problems the pretraining documents carry: as the lower coefficients
    of a pretraining problem (F_7[X]/(X^d) maps onto F_7[X]/(X^d') for d' <= d, so this is the
    transfer the design counts on), and literally (the dropped coefficients all 0)."""
    if ring.degree > pretrain_ring.degree:
        return "pretraining is in a smaller ring: it carries none of the finetuning problems"
    carried: dict[tuple[int, ...], bool] = {}
    for document in pretraining:
        problem, literal = projected_problem(document, pretrain_ring.degree, ring.degree)
        carried[problem] = carried.get(problem, False) or literal
    problems = [problem_of(doc) for doc in test]
    return (f"posing a problem that a pretraining document carries in its lower coefficients: "
            f"{sum(p in carried for p in problems)} of {len(problems)}, literally (its other "
            f"coefficients all 0): {sum(carried.get(p, False) for p in problems)}")


def _slug(arm: str) -> str:
    """A run-directory name for an arm: ``n=4 → n'=1`` -> ``4to1``, the control -> ``1shallow_to1``."""
    source, target = arm.replace("'", "").split(" → ")
    return f"{source.split('=')[1].replace(' depth-matched', 'shallow_')}to{target.split('=')[1]}"

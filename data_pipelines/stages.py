"""Running one datatrove stage of ``megatrain data prepare`` on this machine, quietly and resumably.

A stage is a list of pipeline steps run as ``tasks`` datatrove tasks. Each finished task leaves
``completions/<rank>`` and ``stats/<rank>.json`` in the stage's logging folder; a stage run again
in the same folder (a prepare resumed after a kill) runs only the tasks without a completion, and
its statistics are those files' sum whoever ran them (this run, an earlier one, a SLURM array).

Quiet: datatrove logs every task at INFO on stderr (~460 lines for the embedded corpus: pipeline
listings, per-step and per-bucket statistics). Here they go only to the task's log file
(``<logging folder>/logs/task_<rank>.log``, inside the dataset's ``logs/``); errors still reach
stderr, and megatrain prints its own summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor with nothing of datatrove's on the console: each task logs to
    its file only, and the executor's own messages here (launching, skipping, the merged
    statistics) are switched off around ``run``. A failing task still fails the stage: its
    exception reaches ``run``'s caller (from a worker too), its traceback is in the task's file."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        from datatrove.executor import base
        from loguru import logger

        # datatrove's _run_for_rank calls base.add_task_logger, which always adds a stderr sink
        # (INFO, or ERROR with tracebacks when local_rank != 0) beside the file; for this call the
        # task gets the file alone. Restored after, so other executors in the process are unchanged.
        real = base.add_task_logger
        base.add_task_logger = _file_only_task_logger
        logger.enable("datatrove")  # a task run in this process (workers=1) writes its log file
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        finally:
            base.add_task_logger = real
            logger.disable("datatrove")

    def run(self):
        from loguru import logger

        logger.disable("datatrove")
        try:
            return super().run()
        finally:
            logger.enable("datatrove")


def _file_only_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's ``add_task_logger`` without its console sink: ``logs/task_<rank>.log`` at DEBUG."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, level="DEBUG", colorize=False,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def run_local_stage(name: str, pipeline: list, *, tasks: int, workers: int, logs: Path):
    """Runs stage ``name``'s unfinished tasks here; returns the whole stage's statistics (``load_stats``)."""
    if workers > 1 and tasks > 1:
        preload_forkserver()
    executor = QuietLocalExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                  logging_dir=str(logs / name), skip_completed=True)
    executor.run()
    return load_stats(logs / name, tasks)


def load_stats(logging_dir: str | Path, tasks: int) -> dict[str, dict[str, float]]:
    """Per pipeline step (its ``repr``, as datatrove names it), each metric's total over the stage's
    tasks, summed from the ``stats/<rank>.json`` files they wrote. Read as JSON: datatrove's
    ``PipelineStats.from_json`` keeps each metric as its raw JSON value (a number or a dict with a
    ``total``), which its own ``+`` cannot add."""
    totals: dict[str, dict[str, float]] = {}
    for rank in range(tasks):
        path = Path(logging_dir) / "stats" / f"{rank:05d}.json"
        if not path.is_file():
            continue
        for step in json.loads(path.read_text()):
            into = totals.setdefault(step["name"], {})
            for metric, value in step["stats"].items():
                total = value["total"] if isinstance(value, dict) else value
                into[metric] = into.get(metric, 0) + total
    return totals


def step_totals(stats: dict[str, dict[str, float]], step) -> dict[str, float]:
    """Totals of a pipeline step's metrics, from a stage's ``load_stats``."""
    return stats.get(repr(step), {})


# What the workers of every stage import: loaded once in the forkserver (``preload_forkserver``).
_WORKER_MODULES = (
    "megatrain.data_pipelines.steps", "megatrain.data_pipelines.readers", "megatrain.data_pipelines.stages",
    "datatrove.executor.local",
    "datatrove.pipeline.dedup", "datatrove.pipeline.writers", "datatrove.pipeline.tokens.tokenizer",
)  # fmt: skip


def preload_forkserver() -> None:
    """Has the forkserver that ``LocalPipelineExecutor`` starts its workers from import, once, what
    each worker would otherwise import again in every stage: the pipeline's modules, and the modules
    a script ``__main__`` imported. multiprocess re-runs such a script in every worker it starts
    (its forkserver never preloads ``__main__``: it is sent the script's path under a key that
    ``forkserver.main`` does not read), and the ``megatrain`` console script imports ``megatrain.cli``
    (~5 s of CPU, torch included): before this, 5 stages x K workers of it per prepare. With them
    preloaded a worker starts in milliseconds. The forkserver imports by name on its own default
    ``sys.path`` (installed packages, the working directory) and skips what it cannot find there.
    No effect once the forkserver runs (there is one per process: the first forkserver pool of any
    kind starts it), so a process that runs other datatrove pools before ``prepare_dataset`` (e.g.
    the benchmark's floor) calls this first."""
    import types

    import multiprocess

    modules = list(_WORKER_MODULES)
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", True) is None and getattr(main, "__file__", None):  # a script, not -m
        script_dir = os.path.dirname(os.path.abspath(main.__file__))
        for key, value in list(vars(main).items()):
            if key.startswith("__"):  # __builtins__, __loader__, ...
                continue
            try:
                is_module = isinstance(value, types.ModuleType)
                name = value.__name__ if is_module else getattr(value, "__module__", None)
            except Exception:  # an object with an odd __getattr__: not a module's name
                continue
            if isinstance(name, str) and _forkserver_finds_the_same(name, script_dir):
                modules.append(name)
    multiprocess.get_context("forkserver").set_forkserver_preload(list(dict.fromkeys(modules)))


def _forkserver_finds_the_same(name: str, script_dir: str) -> bool:
    """Whether the forkserver would import module ``name`` from the file this process has. Its
    ``sys.path`` (``python -c``) starts with the working directory instead of the script's folder:
    a module from the script's folder would not be found, and one in the working directory would
    shadow an installed module of the same name (workers would then get that one)."""
    module = sys.modules.get(name)
    top = name.partition(".")[0]
    origin = getattr(getattr(sys.modules.get(top), "__spec__", None), "origin", None)
    if getattr(module, "__spec__", None) is None or not origin:
        return False  # __main__ itself, or a module without a file

    def in_folder(folder: str) -> bool:  # the top-level module or package sits right in folder
        return origin in (os.path.join(folder, top + ".py"), os.path.join(folder, top, "__init__.py"))

    cwd = os.getcwd()
    if in_folder(script_dir):
        return cwd == script_dir
    shadowed = os.path.exists(os.path.join(cwd, top)) or os.path.exists(os.path.join(cwd, top + ".py"))
    return not shadowed or in_folder(cwd)



"""Throughput of ``megatrain data prepare`` on real code, against a plain datatrove floor.

The corpus: the ``.py`` files of this interpreter's site-packages and standard library (UTF-8 ones,
in sorted path order) written by this script as JSONL shards (``content``, ``path``, ``lang``) until
``--mb`` megabytes of text; nothing is downloaded. Shards are 25 MB, or ``--mb``/8 when that is less:
both pipelines give each task whole shards, so a corpus of fewer shards than tasks leaves tasks idle.
A 32k byte-level BPE tokenizer is trained on the
first ~20 MB (not timed) and both pipelines use it as ``--tokenizer PATH``.

- full: ``prepare_dataset`` on the shards: read -> language / length / line / alnum filters -> exact
  dedup -> MinHash near dedup -> train/val split -> tokenize -> ``.ds`` shards + manifest.
- floor: datatrove's ``JsonlReader`` -> ``DocumentTokenizer`` on the same shards, nothing else.

Each at ``--tasks`` (default 1 and 2), timed with ``time.perf_counter`` around the whole call, with
the CPU seconds it used (this process and its descendants, sampled from /proc: datatrove's pool
workers are children of its forkserver, which ``getrusage`` does not see) and the 1-minute load
average at its start. On a shared machine the CPU column is the one to compare: with the kernel's
autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) every session gets an equal share
of the cores while others are busy, so a run's extra tasks only add speed on cores nobody else wants.
MB/s counts the input text (UTF-8 bytes of ``content``), tokens/s the tokens each one wrote (the full
pipeline writes fewer: it drops filtered and duplicate files). The full pipeline's time per stage
comes from timing each stage it runs; the half-size run (``--scaling``, tasks 1) shows how the dedup
stages grow with the input (linear: ~2x for 2x the data; quadratic would be ~4x).

    python benchmarks/data_prepare.py                      # 200 MB, tasks 1 and 2, appends docs
    python benchmarks/data_prepare.py --mb 20 --out-md ''  # a quick look, prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
SHARD_MB = 25
MIN_SHARDS = 8  # smaller corpora get smaller shards: every task of --tasks up to 8 gets some
TOKENIZER_SAMPLE_MB = 20
STAGE_GROUPS = {  # prepare's stage names -> the columns of the stage table
    "1_read_filter": "read+filter",
    "2_exact_find": "exact dedup + MinHash signatures",
    "3_exact_filter_minhash_sigs": "exact dedup + MinHash signatures",
    "4_minhash_buckets": "MinHash buckets, clusters, filter",
    "5_minhash_cluster": "MinHash buckets, clusters, filter",
    "6_minhash_filter": "MinHash buckets, clusters, filter",
    "7_tokenize": "tokenize (both splits)",
}


def python_files() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = dict.fromkeys([paths["purelib"], paths["platlib"], paths["stdlib"]])
    files = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def shard_mb(megabytes: float) -> float:
    return min(SHARD_MB, megabytes / MIN_SHARDS)


def write_corpus(folder: Path, megabytes: float) -> tuple[int, int]:
    """JSONL shards of ~shard_mb(megabytes) each; returns (documents, text bytes)."""
    folder.mkdir(parents=True)
    target = int(megabytes * 1e6)
    shard_bytes = shard_mb(megabytes) * 1e6
    total = docs = shard = 0
    out = None
    for path in python_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        if out is None or out.tell() > shard_bytes:
            if out:
                out.close()
            out = open(folder / f"shard_{shard:04d}.jsonl", "w", encoding="utf-8")
            shard += 1
        out.write(json.dumps({"content": text, "path": str(path), "lang": "Python"}) + "\n")
        total += len(text.encode())
        docs += 1
        if total >= target:
            break
    out.close()
    if total < target:
        print(f"note: only {total / 1e6:.0f} MB of Python found, below --mb {megabytes}", file=sys.stderr)
    return docs, total


class TreeCPU:
    """CPU seconds of this process and all its descendants, from /proc/<pid>/stat sampled every
    ``interval`` s (a process's CPU in its last interval before it exits is missed: <= 0.25 s per
    pool worker). datatrove's workers are children of its forkserver, not of this process, so
    ``resource.getrusage(RUSAGE_CHILDREN)`` never counts them."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.cpu: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds last seen
        self.lock = threading.Lock()
        self.ticks = os.sysconf("SC_CLK_TCK")
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            cpu = (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime
            procs[int(name)] = (int(fields[1]), cpu, int(fields[19]))  # ppid, CPU, start time
        tree, grew = {os.getpid()}, True
        while grew:
            new = {pid for pid, (ppid, _, _) in procs.items() if ppid in tree} - tree
            tree |= new
            grew = bool(new)
        with self.lock:
            for pid in tree & procs.keys():
                self.cpu[(pid, procs[pid][2])] = procs[pid][1]

    def total(self) -> float:
        self.sample()
        with self.lock:
            return sum(self.cpu.values())


CPU: TreeCPU  # started in main(): workers re-run this module's top level (multiprocess's __main__)


def train_tokenizer(corpus: Path, out: Path) -> None:
    from megatrain.data_pipelines.vocab import train_bpe_tokenizer

    def sample():
        seen = 0
        for shard in sorted(corpus.glob("*.jsonl")):
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["content"]
                    seen += len(text)
                    yield text
                    if seen > TOKENIZER_SAMPLE_MB * 1e6:
                        return

    train_bpe_tokenizer(sample(), 32000).save(str(out))


def run_full(corpus: Path, out: Path, tokenizer: Path, tasks: int) -> dict:
    from megatrain.data_pipelines import prepare as prepare_module
    from megatrain.data_pipelines import stages

    stage_seconds: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}

    def timed_stage(name, pipeline, **kwargs):
        started, cpu = time.perf_counter(), CPU.total()
        result = stages.run_local_stage(name, pipeline, **kwargs)
        group = STAGE_GROUPS.get(name, name)
        stage_seconds[group] = stage_seconds.get(group, 0.0) + time.perf_counter() - started
        stage_cpu[group] = stage_cpu.get(group, 0.0) + CPU.total() - cpu
        return result

    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), CPU.total()
    manifest = prepare_module.prepare_dataset(corpus, out, tokenizer=str(tokenizer), tasks=tasks,
                                              progress=False, run_stage=timed_stage)
    seconds, cpu = time.perf_counter() - started, CPU.total() - cpu
    driver = "driver (split, tokenizer, manifest)"
    stage_seconds[driver] = seconds - sum(stage_seconds.values())
    stage_cpu[driver] = cpu - sum(stage_cpu.values())
    splits = manifest["splits"]
    return {"seconds": seconds, "cpu": cpu, "load": load,
            "tokens": splits["train"]["tokens"] + splits["val"]["tokens"],
            "documents": splits["train"]["documents"] + splits["val"]["documents"], "stages": stage_seconds,
            "stage_cpu": stage_cpu}


def run_floor(corpus: Path, out: Path, tokenizer: Path, tasks: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer
    from loguru import logger

    from megatrain.data_pipelines.vocab import EOS_TOKEN

    logger.disable("datatrove")
    pipeline = [
        JsonlReader(str(corpus), text_key="content", glob_pattern="*.jsonl"),
        DocumentTokenizer(str(out / "ds"), tokenizer_name_or_path=str(tokenizer), eos_token=EOS_TOKEN,
                          shuffle_documents=False, save_final_metadata=False),
    ]
    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), CPU.total()
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(out / "logs"),
                          skip_completed=False).run()
    seconds, cpu = time.perf_counter() - started, CPU.total() - cpu
    logger.enable("datatrove")
    tokens = sum(p.stat().st_size // 2 for p in (out / "ds").glob("*.ds"))
    documents = sum(p.stat().st_size // 8 for p in (out / "ds").glob("*.ds.index"))
    return {"seconds": seconds, "cpu": cpu, "load": load, "tokens": tokens, "documents": documents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="megabytes of code text in the corpus")
    parser.add_argument("--tasks", default="1,2", help="comma-separated task counts")
    parser.add_argument("--no-scaling", action="store_true", help="skip the half-size full run (tasks 1)")
    parser.add_argument("--work-dir", default="", help="where corpus and outputs go (default: a temp dir)")
    parser.add_argument("--out-md", default=str(REPO / "docs" / "benchmarks.md"), help="'' = print only")
    parser.add_argument("--note", default="", help="a sentence appended to the docs entry")
    args = parser.parse_args()
    task_counts = [int(t) for t in args.tasks.split(",")]

    from megatrain.data_pipelines import stages

    global CPU
    CPU = TreeCPU()
    # as `megatrain data prepare` has it, whose first pool starts the forkserver: here the floor's
    # pool would start it first, and every full-pipeline worker would then import its modules anew
    stages.preload_forkserver()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="megatrain-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = work / "corpus", work / "tokenizer.json"
    shutil.rmtree(corpus, ignore_errors=True)
    documents, text_bytes = write_corpus(corpus, args.mb)
    print(f"corpus: {documents} files, {text_bytes / 1e6:.1f} MB in {corpus}", file=sys.stderr)
    train_tokenizer(corpus, tokenizer)
    load_start = os.getloadavg()[0]

    rows, stage_rows = [], []
    for tasks in task_counts:
        for name, run in (("floor: read -> tokenize", run_floor), ("full pipeline", run_full)):
            out = work / f"{name.split(':')[0].split()[0]}_k{tasks}"
            shutil.rmtree(out, ignore_errors=True)
            result = run(corpus, out, tokenizer, tasks)
            shutil.rmtree(out, ignore_errors=True)
            rows.append((name, tasks, text_bytes, result))
            if "stages" in result:
                stage_rows.append((f"{args.mb:g} MB, tasks {tasks}", result))
            print(f"{name} tasks {tasks}: {result['seconds']:.1f} s, CPU {result['cpu']:.1f} s, "
                  f"load at start {result['load']:.1f}", file=sys.stderr)
    if not args.no_scaling:
        half = work / "corpus_half"
        shutil.rmtree(half, ignore_errors=True)
        write_corpus(half, args.mb / 2)
        out = work / "full_half"
        result = run_full(half, out, tokenizer, 1)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(half, ignore_errors=True)
        stage_rows.insert(0, (f"{args.mb / 2:g} MB, tasks 1", result))
    load_end = os.getloadavg()[0]

    floors = {tasks: r for name, tasks, _, r in rows if name.startswith("floor")}
    lines = ["| pipeline | tasks | input MB | documents out | tokens out | wall (s) | MB/s | Mtokens/s "
             "| time / floor's | CPU (s) | CPU / floor's | load at start |", "|---" * 12 + "|"]
    for name, tasks, size, r in rows:
        floor = floors[tasks]
        lines.append(f"| {name} | {tasks} | {size / 1e6:.0f} | {r['documents']} | {r['tokens']} | "
                     f"{r['seconds']:.1f} | {size / 1e6 / r['seconds']:.2f} | "
                     f"{r['tokens'] / 1e6 / r['seconds']:.2f} | {r['seconds'] / floor['seconds']:.2f} | "
                     f"{r['cpu']:.1f} | {r['cpu'] / max(floor['cpu'], 1e-9):.2f} | {r['load']:.1f} |")
    groups = list(dict.fromkeys([*STAGE_GROUPS.values(), "driver (split, tokenizer, manifest)"]))
    stage_lines = ["| full pipeline run | " + " | ".join(f"{g}: wall (CPU) s" for g in groups)
                   + " | total: wall (CPU) s |", "|---|" + "---|" * (len(groups) + 1)]
    for label, r in stage_rows:
        cells = " | ".join(f"{r['stages'].get(g, 0.0):.1f} ({r['stage_cpu'].get(g, 0.0):.1f})"
                           for g in groups)
        stage_lines.append(f"| {label} | {cells} | {r['seconds']:.1f} ({r['cpu']:.1f}) |")
    table = "\n".join(lines) + "\n\nTime per stage of the full pipeline:\n\n" + "\n".join(stage_lines)
    print(table)

    if args.out_md:
        command = "python benchmarks/data_prepare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        today = datetime.date.today().isoformat()
        entry = " ".join([
            f"\n### `megatrain data prepare` throughput vs a plain datatrove floor ({today},",
            f"{machine_name()})\n\nCommand: `{command.strip()}`. Corpus: {documents} `.py` files of this",
            f"interpreter's site-packages and stdlib, {text_bytes / 1e6:.0f} MB of text, as",
            f"{shard_mb(args.mb):g} MB",
            "JSONL shards; both pipelines tokenize with the same 32k BPE tokenizer.json (trained",
            f"beforehand on {TOKENIZER_SAMPLE_MB} MB, not timed). Full = read, filters, exact and MinHash",
            "dedup, split, tokenize, manifest; floor = datatrove JsonlReader -> DocumentTokenizer.",
            "CPU = CPU seconds of the run's processes (sampled from /proc), which other sessions' load",
            "does not change the way it changes wall time.",
            f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end. {args.note}",
        ]) + f"\n\n{table}\n"
        with open(args.out_md, "a", encoding="utf-8") as f:
            f.write(entry)
        print(f"appended to {args.out_md}", file=sys.stderr)


if __name__ == "__main__":
    main()

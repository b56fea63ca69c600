"""Markdown helpers the benchmark scripts share for their docs/benchmarks.md entries."""

import shlex
import sys


def command_line(script: str, argv: list[str] | None) -> str:
    """How the entry's numbers were made: ``python benchmarks/<script>`` and its arguments."""
    return f"python benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def code_span(text: str) -> str:
    """``text`` as a markdown code span, which may itself hold backticks (a --note can)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def print_and_append(table: str, out_md: str) -> None:
    """Print a benchmark's entry and append it to ``out_md`` (docs/benchmarks.md; '' = print only)."""
    print(table)
    if out_md:
        with open(out_md, "a") as f:
            f.write("\n" + table + "\n")
        print(f"appended to {out_md}")

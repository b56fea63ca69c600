"""A memory profile summed up: per head, per phase and per rank, and the table for the terminal."""

from __future__ import annotations


def head_summary(phases: list[dict]) -> dict | None:
    """Per head: its peak above the trunk baseline and what it still holds after its last phase.

    The trunk baseline of a microbatch is what is allocated when its first head phase starts (the
    trunk's activations, the parameters, gradients and optimizer state so far). Each figure is the
    largest over the profiled steps and microbatches. None on a rank without heads.
    """
    groups: dict[tuple, list[dict]] = {}
    for p in phases:
        groups.setdefault((p["step"], p["stage"], p["microbatch"]), []).append(p)
    heads: dict[int, dict] = {}
    baseline = None
    for group in groups.values():
        in_heads = [p for p in group if p["head"] is not None]
        if not in_heads:
            continue
        base = in_heads[0]["start_bytes"]
        baseline = base if baseline is None else max(baseline, base)
        for head in sorted({p["head"] for p in in_heads}):
            mine = [p for p in in_heads if p["head"] == head]
            row = heads.setdefault(head, {"head": head, "peak_above_baseline_bytes": 0, "held_after_bytes": 0,
                                          "peak_bytes": 0})
            row["peak_above_baseline_bytes"] = max(row["peak_above_baseline_bytes"],
                                                   max(p["peak_bytes"] for p in mine) - base)
            row["held_after_bytes"] = max(row["held_after_bytes"], mine[-1]["end_bytes"] - base)
            row["peak_bytes"] = max(row["peak_bytes"], max(p["peak_bytes"] for p in mine))
    if not heads:
        return None
    return {"baseline_bytes": baseline, "heads": [heads[h] for h in sorted(heads)]}


def per_phase_step_peaks(phases: list[dict]) -> dict[tuple[str, int], int]:
    """(phase name, step) -> the phase's peak in that step, the largest over microbatches and stages."""
    peaks: dict[tuple[str, int], int] = {}
    for p in phases:
        key = (p["name"], p["step"])
        peaks[key] = max(peaks.get(key, 0), p["peak_bytes"])
    return peaks


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _stages(entry: dict) -> str:
    stages = sorted({p["stage"] for p in entry["phases"] if p["stage"] is not None})
    return "stage " + ",".join(map(str, stages)) if stages else "no stage"


def _head_table(ranks: list[dict], naive_bytes: int) -> list[str]:
    holders = [(r, head_summary(r["phases"])) for r in ranks]
    holders = [(r, s) for r, s in holders if s is not None]
    if not holders:
        return ["(no rank ran a head phase)"]
    entry, summary = max(holders, key=lambda rs: rs[0]["peak_bytes"])
    lines = [f"rank {entry['rank']} ({_stages(entry)}), trunk baseline when head 1 starts: "
             f"{mib(summary['baseline_bytes'])}",
             f"{'head':>4}  {'peak above baseline':>20}  {'naive all-logits':>17}  {'held after':>12}"]
    for row in summary["heads"]:
        peak, held = mib(row["peak_above_baseline_bytes"]), mib(row["held_after_bytes"])
        lines.append(f"{row['head']:>4}  {peak:>20}  {mib(naive_bytes):>17}  {held:>12}")
    return lines


def format_report(profile: dict) -> str:
    """The terminal report: the per-head table of the rank with the heads and the largest peak,
    each rank's step peak, and the same for the naive loss when it was profiled."""
    m = profile["model"]
    lines = [f"memory per head: n_future={m['n_future']} ({m['head_type']} heads), {m['layout']}, "
             f"{m['tokens_per_microbatch']} tokens per microbatch, vocab {m['vocab_size']}, "
             f"{profile['device']}; {profile['steps']} step(s) after {profile['warmup_steps']} warm-up, "
             f"{profile['baseline']}",
             *_head_table(profile["ranks"], profile["naive_logits_bytes_per_head"]),
             "step peak: " + ", ".join(f"rank {r['rank']} {mib(r['peak_bytes'])}" for r in profile["ranks"])]
    naive = profile.get("naive")
    if naive is not None:
        lines += ["", "the same step with the naive all-logits loss (--compare-naive):",
                  *_head_table(naive["ranks"], naive["naive_logits_bytes_per_head"]),
                  "step peak: " + ", ".join(
                      f"rank {r['rank']} {mib(r['peak_bytes'])} (sequential {mib(s['peak_bytes'])})"
                      for r, s in zip(naive["ranks"], profile["ranks"]))]
    return "\n".join(lines)

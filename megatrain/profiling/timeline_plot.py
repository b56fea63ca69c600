"""``memory_timeline.png``: allocated bytes over time, one panel per rank, the phases shaded."""

from __future__ import annotations

import os
from pathlib import Path

from megatrain.errors import UserError

_FIXED_COLOURS = {"trunk.forward": "tab:blue", "trunk.backward": "tab:purple", "optimizer.step": "tab:gray"}
_HEAD_COLOURS = ["tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
_HEAD_SHADE = {"forward": 0.15, "loss": 0.35, "backward": 0.25}  # one hue per head, a shade per part


def _style(p: dict) -> tuple[str, float, str]:
    """(colour, opacity, legend label) of a phase."""
    if p["head"] is None:
        return _FIXED_COLOURS.get(p["name"], "tab:gray"), 0.15, p["name"]
    part = p["name"].rsplit(".", 1)[-1]
    colour = _HEAD_COLOURS[(p["head"] - 1) % len(_HEAD_COLOURS)]
    return colour, _HEAD_SHADE.get(part, 0.25), f"head{p['head']} (forward | loss | backward)"


def plot_timeline(ranks: list[dict], timelines: list[dict], path: Path, title: str) -> None:
    """Write the plot to ``path`` (atomically). ``ranks``: the profile's rank entries;
    ``timelines``: per rank ``{"t_s": [...], "bytes": [...]}``, seconds from the first profiled step."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("memory_timeline.png needs matplotlib: pip install -e '.[profile]' (install.sh "
                        "installs it)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ranks), 1, figsize=(12, 2.6 * len(ranks) + 0.8), squeeze=False)
    for ax, entry, line in zip(axes[:, 0], ranks, timelines):
        labelled = set()
        for p in entry["phases"]:
            colour, alpha, label = _style(p)
            ax.axvspan(p["start_s"], p["end_s"], color=colour, alpha=alpha, lw=0,
                       label=None if label in labelled else label)
            labelled.add(label)
            if p["name"].endswith(".loss") or p["name"] == "trunk.forward":
                tag = f"h{p['head']}" if p["head"] is not None else "T"
                ax.annotate(tag, (p["start_s"], 1.0), xycoords=("data", "axes fraction"),
                            fontsize=6, va="bottom")
        ax.step(line["t_s"], [b / 2**20 for b in line["bytes"]], where="post", color="black", lw=0.8)
        ax.set_ylabel(f"rank {entry['rank']}\nallocated (MiB)")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    axes[-1, 0].set_xlabel("seconds since the first profiled step (T: trunk.forward, hN: head N's loss)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = Path(f"{path}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

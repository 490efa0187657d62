"""The ``ckptwise simulate --plot`` timeline: bytes on disk over steps, saves and deletions."""

from __future__ import annotations

import os

from ckptwise.simulate import SimulationResult

__all__ = ["plot_simulation"]


def plot_simulation(result: SimulationResult, path: str | os.PathLike[str], *, title: str) -> None:
    """Draw ``result`` as a PNG at ``path`` (needs matplotlib: ``ckptwise[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'ckptwise[plot]'") from exc

    gib = 2**30
    fig, (ax_disk, ax_events) = plt.subplots(
        2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [s for s, _ in result.timeline] + [result.steps]
    on_disk = [b / gib for _, b in result.timeline]
    ax_disk.step(
        steps,
        [*on_disk, on_disk[-1]],
        where="post",
        color="tab:blue",
        label="bytes on disk (spikes: a new checkpoint before pruning)",
    )
    ax_disk.legend(loc="lower right", fontsize="small")
    ax_disk.set_ylabel("on disk (GiB)")
    ax_disk.set_title(title)
    ax_disk.grid(alpha=0.3)
    saved = [s for s, _ in result.saves]
    deleted_at = [a for a, _ in result.deletions]
    ax_events.scatter(saved, [1] * len(saved), marker="|", s=200, color="tab:green", label="save")
    ax_events.scatter(
        deleted_at, [0] * len(deleted_at), marker="x", s=30, color="tab:red", label="deletion"
    )
    kept = list(result.kept)
    ax_events.scatter(
        kept,
        [1] * len(kept),
        marker="o",
        s=40,
        facecolors="none",
        edgecolors="black",
        label="kept at end",
    )
    ax_events.set_yticks([0, 1], ["deleted", "saved"])
    ax_events.set_ylim(-0.5, 1.5)
    ax_events.set_xlabel("step")
    fig.legend(
        *ax_events.get_legend_handles_labels(),
        loc="lower center",
        ncol=3,
        fontsize="small",
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(os.fspath(path), format="png", dpi=110)
    plt.close(fig)

"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes ready to embed."""

from __future__ import annotations

import io
import math

LOSS_TERMS = ("L_f", "L_a", "L_kd", "loss")
MASK_TERMS = ("density", "turnover")


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def revival_heatmap(concepts: list[str], accuracy: list[list[float]], erased_at: list[int],
                    stage_labels: list[str] | None = None) -> bytes:
    """Rows: concepts; columns: base then stage 1..S; cell: top-1 accuracy. A box marks the stage that
    erased each concept: everything to its right should stay dark; a bright cell there is a revival."""
    n_cols = len(accuracy[0]) if accuracy else 1
    plt, fig = _figure(max(4.0, 1.0 + 0.6 * n_cols), max(2.0, 0.8 + 0.35 * len(concepts)))
    ax = fig.add_subplot(1, 1, 1)
    data = [[(math.nan if v is None else v) for v in row] for row in accuracy]
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        if erased_at[i] > 0:
            ax.add_patch(plt.Rectangle((erased_at[i] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    labels = stage_labels or ["base"] + [f"stage {j}" for j in range(1, n_cols)]
    ax.set_xticks(range(n_cols), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(concepts)), concepts, fontsize=7)
    ax.set_title("accuracy (%) after each stage; red: stage that erased it", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(plt, fig)


def training_curves(records: list[dict]) -> bytes | None:
    """Loss terms and mask density / turnover per optimisation step, stages marked by dotted lines."""
    terms = [k for k in LOSS_TERMS if any(k in r for r in records)]
    mask = [k for k in MASK_TERMS if any(k in r for r in records)]
    if not records or not (terms or mask):
        return None
    panels = [t for t in terms] + (["mask"] if mask else [])
    plt, fig = _figure(7.0, 1.6 * len(panels) + 0.4)
    boundaries = [i for i in range(1, len(records)) if records[i].get("stage") != records[i - 1].get("stage")]
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        keys = mask if panel == "mask" else [panel]
        for key in keys:
            xs = [i for i, r in enumerate(records) if key in r]
            ax.plot(xs, [records[i][key] for i in xs], lw=0.8, label=key)
        if panel != "mask" and all(records[i][panel] > 0 for i in range(len(records)) if panel in records[i]):
            ax.set_yscale("log")
        for b in boundaries:
            ax.axvline(b, color="grey", ls=":", lw=0.8)
        ax.set_ylabel(panel, fontsize=8)
        ax.tick_params(labelsize=7)
        if panel == "mask":
            ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("optimisation step (all stages in order)", fontsize=8)
    return _png(plt, fig)


def forgetting_vs_preservation(points: list[tuple[str, float, float]]) -> bytes:
    """One point per run: x = Total Acc on erased concepts (lower is better), y = preserved accuracy."""
    plt, fig = _figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for label, total, kept in points:
        ax.scatter([100 * total], [100 * kept], s=30)
        ax.annotate(label, (100 * total, 100 * kept), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("Total Acc on erased concepts (%) - lower is better", fontsize=8)
    ax.set_ylabel("accuracy on kept classes (%) - higher is better", fontsize=8)
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3)
    return _png(plt, fig)

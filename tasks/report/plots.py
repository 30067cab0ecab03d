"""The report's figures, each returned as a base64 PNG for html.py to inline (no files beside the page).

    loss_plot(f["curves"])        # train/val loss, QLoRA vs the LoRA baseline
    accuracy_plot(acc, level)     # the gate metric per model with its intervals (frames.accuracy_frame)
    confusion_plot(cm, title)     # a label task's confusion matrix (frames.confusion)
    png_base64(fig)               # any Figure -> base64 PNG (scores.distribution_plot uses it too)

matplotlib is imported inside each function: it is heavy and only a report build needs it.
"""
from __future__ import annotations

import base64
import io


def png_base64(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg on this figure only: no pyplot, no process-wide backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def loss_plot(curves: dict) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    for kind, color in (("qlora", "tab:blue"), ("lora", "tab:orange")):
        for k, style, lab in (("train_loss", "-", "train"), ("val_loss", "o--", "val")):
            pts = curves.get(kind, {}).get(k) or []
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{kind.upper()} {lab}", alpha=0.9 if lab == "val" else 0.7)
    ax.set(xlabel="step", ylabel="loss", title="Training: QLoRA vs the LoRA baseline (same data, same schedule)")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_base64(fig)


def accuracy_plot(acc, level: str = "95%") -> str:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    y = acc["score"].to_numpy(float)
    # Clipped at 0: a Wilson bound at accuracy 0 or 1 can sit a rounding error past the point.
    err = np.clip([y - acc["ci_low"].to_numpy(float), acc["ci_high"].to_numpy(float) - y], 0, None)
    ax.bar(acc["model"], y, yerr=err, capsize=6, color=["tab:gray", "tab:orange", "tab:blue", "tab:green",
                                                        "tab:purple"][:len(y)])
    for i, v in enumerate(y):
        ax.annotate(f"{v:.3f}", (i, v), xytext=(8, 3), textcoords="offset points", fontsize=9)
    metric = acc["metric"].iloc[0] if len(acc) else "exact_match"
    top = 1.05 if metric != "nll" else max(1.0, float(np.nanmax(acc["ci_high"].to_numpy(float))) * 1.1)
    ax.set(ylim=(0, top), ylabel=f"test {metric}", title=f"{metric} on the same test rows, with {level} intervals")
    ax.grid(axis="y", alpha=0.3)
    return png_base64(fig)


def confusion_plot(cm, title: str) -> str:
    from matplotlib.figure import Figure

    k = len(cm.index)
    fig = Figure(figsize=(1.2 + 0.6 * (k + 1), 1.0 + 0.5 * k))
    ax = fig.add_subplot()
    ax.imshow(cm.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(cm.columns)), [str(x) for x in cm.columns], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(x) for x in cm.index])
    top = max(int(cm.to_numpy().max()), 1)
    for i in range(k):
        for j in range(len(cm.columns)):
            v = int(cm.iat[i, j])
            if v:
                ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    ax.set(xlabel="predicted", ylabel="reference", title=title)
    return png_base64(fig)

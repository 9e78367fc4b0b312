"""Loss and accuracy curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

from .io import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5), dpi=100)


def _mark_kept(ax, epochs: list[dict], kept: int | None) -> None:
    """A dotted line at the epoch whose weights the run kept, when that is not simply the last one."""
    if kept is not None and epochs and kept != epochs[-1]["epoch"]:
        ax.axvline(kept, color="gray", linestyle=":", label=f"weights kept: epoch {kept}")


def _save(plt, fig, ax, path: str | os.PathLike) -> None:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_loss(
    epochs: list[dict], steps: list[dict], path: str | os.PathLike, kept: int | None = None
) -> None:
    """Training loss per logged batch and per epoch, and validation loss per epoch, against epochs; `kept`:
    the epoch whose weights the run kept (marked when it is not the last)."""
    plt, fig, ax = _figure()
    if steps:
        per_epoch = {}
        for s in steps:
            per_epoch[s["epoch"]] = max(per_epoch.get(s["epoch"], 0), s["batch"])
        # A logged batch b of epoch e sits at e - 1 + b / (batches in e), so both curves share the x axis.
        total = {
            e["epoch"]: e.get("batches", per_epoch[e["epoch"]]) for e in epochs if e["epoch"] in per_epoch
        }
        x = [s["epoch"] - 1 + s["batch"] / total.get(s["epoch"], per_epoch[s["epoch"]]) for s in steps]
        ax.plot(
            x,
            [s["loss"] for s in steps],
            color="tab:blue",
            alpha=0.35,
            label="training loss (logged batches)",
        )
    ax.plot(
        [e["epoch"] for e in epochs],
        [e["train_loss"] for e in epochs],
        "o-",
        color="tab:blue",
        label="training loss (epoch mean)",
    )
    ax.plot(
        [e["epoch"] for e in epochs],
        [e["val_loss"] for e in epochs],
        "s--",
        color="tab:orange",
        label="validation loss",
    )
    ax.set_xlabel("epoch")
    _mark_kept(ax, epochs, kept)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    _save(plt, fig, ax, path)


def plot_accuracy(epochs: list[dict], path: str | os.PathLike, kept: int | None = None) -> None:
    """Training (running, per epoch) and validation accuracy per epoch; `kept` as in `plot_loss`."""
    plt, fig, ax = _figure()
    x = [e["epoch"] for e in epochs]
    ax.plot(x, [100 * e["train_accuracy"] for e in epochs], "o-", label="training accuracy")
    ax.plot(x, [100 * e["val_accuracy"] for e in epochs], "s--", label="validation accuracy")
    ax.set_xlabel("epoch")
    _mark_kept(ax, epochs, kept)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy")
    ax.set_xticks(x)
    _save(plt, fig, ax, path)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | os.PathLike, title: str) -> None:
    """The confusion matrix twice, side by side: counts, and each true class's row as fractions of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(labels)
    size = max(4.0, 0.7 * k + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), dpi=100)
    for ax, values, what in (
        (axes[0], counts, "counts"),
        (axes[1], normalised, "fraction of the true class"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        ax.set_xticks(range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(what)
        for i in range(k):
            for j in range(k):
                text = f"{int(counts[i, j]):,}" if values is counts else f"{values[i, j]:.2f}"
                dark = values[i, j] > 0.6 * (values.max() or 1)
                ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

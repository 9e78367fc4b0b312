"""Loss and accuracy curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import os

from .io import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5), dpi=100)


def _save(plt, fig, ax, path: str | os.PathLike) -> None:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_loss(epochs: list[dict], steps: list[dict], path: str | os.PathLike) -> None:
    """Training loss per logged batch and per epoch, and validation loss per epoch, against epochs."""
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
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    _save(plt, fig, ax, path)


def plot_accuracy(epochs: list[dict], path: str | os.PathLike) -> None:
    """Training (running, per epoch) and validation accuracy per epoch."""
    plt, fig, ax = _figure()
    x = [e["epoch"] for e in epochs]
    ax.plot(x, [100 * e["train_accuracy"] for e in epochs], "o-", label="training accuracy")
    ax.plot(x, [100 * e["val_accuracy"] for e in epochs], "s--", label="validation accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy")
    ax.set_xticks(x)
    _save(plt, fig, ax, path)

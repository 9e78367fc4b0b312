"""Classification metrics (accuracy, per-class precision / recall / F1, macro and weighted F1, confusion
matrix) and their text report, laid out as scikit-learn's `classification_report`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, their macro and support-weighted means, and
    the confusion matrix (rows: true, columns: predicted). An undefined ratio (no predictions or no rows
    of a class) counts as 0, as scikit-learn's `zero_division=0`."""
    k = len(labels)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    per_class = {}
    for i, name in enumerate(labels):
        tp = int(matrix[i, i])
        predicted, actual = int(matrix[:, i].sum()), int(matrix[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = int(matrix.sum())
    metrics = {
        "accuracy": float(np.trace(matrix)) / total if total else 0.0,
        "count": total,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
    for kind in ("macro", "weighted"):
        for score in ("precision", "recall", "f1"):
            metrics[f"{kind}_{score}"] = _average(per_class, score, kind, total)
    return metrics


def _average(per_class: dict, score: str, kind: str, total: int) -> float:
    values = [row[score] for row in per_class.values()]
    if kind == "macro":
        return float(np.mean(values)) if values else 0.0
    return sum(row[score] * row["support"] for row in per_class.values()) / total if total else 0.0


def metrics_from_logits(logits: torch.Tensor, labels: Sequence[int], label_names: Sequence[str]) -> dict:
    """`classification_metrics` of the argmax predictions, plus the mean cross-entropy `loss`."""
    targets = torch.as_tensor(list(labels), dtype=torch.long)
    metrics = classification_metrics(targets.tolist(), logits.argmax(-1).tolist(), label_names)
    metrics["loss"] = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
    return metrics


def unseen_accuracy(logits: torch.Tensor, labels: Sequence[int], seen: Sequence[bool]) -> dict | None:
    """Accuracy on the rows whose text does not also occur in the training split (`seen` False), with
    their `count` and how many rows were `seen`: what a split says about new texts. None when no row was
    seen (the split's own accuracy says it); its accuracy None when every row was."""
    if not any(seen):
        return None
    unseen = [i for i, s in enumerate(seen) if not s]
    predicted = logits.argmax(-1).tolist()
    correct = sum(predicted[i] == labels[i] for i in unseen)
    return {"count": len(unseen), "seen": len(seen) - len(unseen),
            "accuracy": correct / len(unseen) if unseen else None}  # fmt: skip


def describe_unseen(unseen: dict, rows: str = "texts") -> str:
    """`unseen_accuracy`'s result in words, for a summary line."""
    if unseen["accuracy"] is None:
        return f"every one of its {rows} also occurs in the training split"
    return f"{unseen['accuracy']:.2%} on the {unseen['count']:,} {rows} not in the training split"


def format_report(metrics: dict, digits: int = 3) -> str:
    """The per-class table plus accuracy, macro and weighted averages, as `classification_report` prints."""
    names = list(metrics["per_class"])
    width = max(len("weighted avg"), *(len(n) for n in names))
    header = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    lines = [header, ""]
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:>{width}} {row['precision']:>9.{digits}f} {row['recall']:>9.{digits}f} "
                     f"{row['f1']:>9.{digits}f} {row['support']:>9}")  # fmt: skip
    lines.append("")
    lines.append(
        f"{'accuracy':>{width}} {'':>9} {'':>9} {metrics['accuracy']:>9.{digits}f} {metrics['count']:>9}"
    )
    for kind, title in (("macro", "macro avg"), ("weighted", "weighted avg")):
        lines.append(f"{title:>{width}} {metrics[f'{kind}_precision']:>9.{digits}f} "
                     f"{metrics[f'{kind}_recall']:>9.{digits}f} {metrics[f'{kind}_f1']:>9.{digits}f} "
                     f"{metrics['count']:>9}")  # fmt: skip
    return "\n".join(lines)

"""Turning token ids into padded batches: length-aware batching for training, sorted batches for inference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Rows are sorted by length inside windows of this many batches; the batch order is then shuffled.
# Large enough that batches are nearly uniform in length, small enough that training stays random.
BUCKET_BATCHES = 32


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    bucketing: bool = True,
    window_batches: int = BUCKET_BATCHES,
    labels: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """The training batches (lists of row indices) of one epoch; deterministic in (seed, epoch).

    Without bucketing: a plain shuffle cut into batches. With bucketing: shuffle, sort each window of
    `window_batches` batches by length, cut, and shuffle the batch order (`window_batches=1`: random
    batches, each padded only to its own longest row).

    With `labels`, each window is sorted by the length rank *within its class* instead, so every batch
    mixes the classes in the window's proportions (rows of a class still similar in length). Plain length
    sorting makes batches of one class whenever length predicts the label (SMS spam is twice as long as
    ham: 40 % of the batches were all ham or all spam), and each such step pulls toward one class.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not bucketing:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    lengths = np.asarray(lengths)
    labels = None if labels is None else np.asarray(labels)
    window = batch_size * max(1, window_batches)
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        if labels is not None:
            chunk = chunk[np.argsort(_rank_within_class(labels[chunk]), kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _rank_within_class(labels: np.ndarray) -> np.ndarray:
    """For rows already in length order: each row's quantile among the rows of its own class."""
    quantile = np.empty(len(labels))
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        quantile[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    return quantile


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Inference batches: rows sorted by length (longest first), so each batch pads very little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    rows: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad `rows` to their longest (or to `pad_to`): `(input_ids, attention_mask)`, both batch × seq."""
    width = max(pad_to or 0, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def collate_packed(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack `rows` end to end into one row without padding: `(input_ids, lengths)`, shapes 1 × total and n.

    The models keep the rows apart with `segment_positions` (each row's positions restart at 0) and
    `segment_mask` (a token attends only within its own row), so every row computes exactly what it
    computes alone, and a batch costs its real tokens only."""
    lengths = torch.as_tensor([len(r) for r in rows], dtype=torch.long)
    input_ids = torch.as_tensor([token for row in rows for token in row], dtype=torch.long)
    return input_ids.unsqueeze(0), lengths


def segment_positions(lengths: torch.Tensor) -> torch.Tensor:
    """Position ids of a packed row: 0, 1, …, n₁−1, 0, 1, …, n₂−1, …"""
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(starts, lengths)


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """Which packed row each token belongs to: 0 … 0, 1 … 1, …"""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def segment_mask(lengths: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean attention mask (1 × 1 × total × total) of a packed row: block diagonal, one block per row,
    and lower triangular within each block when `causal`."""
    ids = segment_ids(lengths)
    mask = ids[:, None] == ids[None, :]
    if causal:
        mask = mask.tril()
    return mask[None, None]

"""Turning token ids into padded batches: length-aware batching for training, sorted batches for inference."""

from __future__ import annotations

import math
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


def sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Inference batches: rows sorted by length (longest first), so each batch pads very little; at most
    `batch_size` rows each and, with `max_tokens`, at most that many tokens (but always one row at least)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start, tokens = [], 0, 0
    for end, row in enumerate(order):
        if end > start and (end - start == batch_size or tokens + lengths[row] > max_tokens):
            batches.append(order[start:end])
            start, tokens = end, 0
        tokens += lengths[row]
    return batches + [order[start:]] if start < len(order) else batches


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


# A packed row of width W costs its linears per token plus attention that grows with W: per token,
# 1 + W / ATTENTION_WIDTH_COST in units of the linears (set from GPT-2 124M bf16 step timings; the exact
# value matters little: widths 60-90 and 5-8 % padding for SMS batches of 8 across 256-1024).
ATTENTION_WIDTH_COST = 1024
# Widths tried: from the shortest possible one (the longest row, rounded up to `multiple`) to this many
# tokens wider (24 multiples of 16; any width, 385 candidates, costs 0.7 ms per SMS batch of 8).
WIDTH_WINDOW = 384


def _first_fit_bins(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` packed first fit, longest first, into bins of `width` (each length <= width)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b in range(len(bins)):
            if lengths[i] <= free[b]:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(width - lengths[i])
    return bins


def packed_width(lengths: Sequence[int], multiple: int = 1) -> int:
    """The packed row width (a multiple of `multiple`, at least the longest length) that makes a batch
    cheapest: fewest padded cells, weighed by the attention cost of wide rows (`ATTENTION_WIDTH_COST`).

    Rows as wide as the longest text pad a lot when a batch's texts are of similar length (length
    bucketing makes them so: one text per row, each padded to the longest); a wider row fits two or three
    texts. On the SMS training batches padding fell from 14.5 % to 7.3 % (multiples of 16) or 1.9 % (any
    width), inference's from 18.5 % to 5.5 % (multiples of 16)."""
    shortest = -(-max(lengths) // multiple) * multiple
    widest = max(shortest, -(-sum(lengths) // multiple) * multiple)
    best_width, best_cost = shortest, math.inf
    for width in range(shortest, min(widest, shortest + WIDTH_WINDOW) + 1, multiple):
        cost = len(_first_fit_bins(lengths, width)) * width * (1 + width / ATTENTION_WIDTH_COST)
        if cost < best_cost:
            best_width, best_cost = width, cost
    return best_width


def collate_packed(
    rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack `rows` end to end into as few rows of `width` as hold them (first fit, longest first), so a
    batch costs its real tokens plus a little padding in its last packed rows. `width` defaults to the
    longest of `rows` rounded up to `multiple` (`packed_width` chooses a cheaper one): a multiple gives
    fewer distinct shapes for the kernels and the allocator to see, at the price of a little padding.

    Returns `(input_ids, positions, segments)`, all packed rows × width: `positions` restart at 0 for
    each row of `rows`; `segments` says which of `rows` each token belongs to (-1: padding). The models
    let a token attend only within its own segment (`segment_mask`), so every row computes exactly what
    it computes alone."""
    longest = max(len(r) for r in rows)
    width = width or -(-longest // multiple) * multiple
    if width < longest:
        raise ValueError(f"packed width {width} is narrower than the longest row ({longest} tokens)")
    bins = _first_fit_bins([len(r) for r in rows], width)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    segments = torch.full((len(bins), width), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        offset = 0
        for i in members:
            n = len(rows[i])
            input_ids[b, offset : offset + n] = torch.as_tensor(rows[i], dtype=torch.long)
            positions[b, offset : offset + n] = torch.arange(n)
            segments[b, offset : offset + n] = i
            offset += n
    return input_ids, positions, segments


def segment_mask(segments: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean attention mask (packed rows × 1 × width × width): a token attends to the tokens of its own
    segment (padding, -1, only to padding), and with `causal` only to those at or before it."""
    mask = segments[:, :, None] == segments[:, None, :]
    if causal:
        width = segments.shape[1]
        mask = mask & torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    return mask[:, None]

"""Masked multi-head attention for GPT-2 and BERT: PyTorch's fused kernel or two plain products.

Packed rows (several texts per row, kept apart by a block-diagonal mask) are short, and on a CPU
PyTorch's masked flash-attention kernel is slow for them, in the backward pass above all: at GPT-2
124M's training shapes (6 packed rows of 47 tokens, bf16, 2 cores) its forward and backward took 8–11 ms
per layer against 2–3.6 ms for `softmax(q kᵀ / √d + mask) v` written out (benchmarks/README.md#speed).
The written-out form keeps a rows × heads × width² score tensor per layer for the backward pass, so
it is used only while that stays small (`MATH_MAX_SCORES`); longer rows, a single short text, and every
GPU keep the fused kernel, which never materialises the scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNELS = ("auto", "math", "sdpa")
# auto writes the products out on a CPU while one layer's scores (batch × heads × seq²) number between
# these two: below, the fused kernel's lower call overhead wins (one text of 16 tokens: 0.06 vs 0.10 ms);
# above, the stored scores would cost too much memory (4 M: 8 MiB per layer in bf16; a GPT-2 training
# batch of SMS messages needs about 0.3 M).
MATH_MIN_SCORES = 2**14
MATH_MAX_SCORES = 4 * 2**20
_kernel = "auto"


def set_kernel(kernel: str) -> None:
    """Choose the attention kernel for this process: auto (default), math or sdpa (`--attention`)."""
    global _kernel
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    _kernel = kernel


def get_kernel() -> str:
    return _kernel


def uses_math(q: torch.Tensor) -> bool:
    """Whether `attention` writes the products out for these shapes (see the module docstring)."""
    if _kernel != "auto":
        return _kernel == "math"
    b, h, t, _ = q.shape
    return q.device.type == "cpu" and MATH_MIN_SCORES <= b * h * t * t <= MATH_MAX_SCORES


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    dropout_p: float = 0.0,
    causal: bool = False,
) -> torch.Tensor:
    """`softmax(q kᵀ / √d + mask) v` over batch × heads × seq × head_dim tensors.

    `keep` is a boolean mask of the keys each query may see, broadcastable to batch × 1 × seq × seq
    (already causal where that applies), or a float bias added to the scores (broadcastable to batch ×
    heads × seq × seq), or None: every key, or with `causal` the keys at or before the query. A masked-out
    key adds the dtype's most negative number rather than -inf, so a query that may see no key at all
    attends uniformly instead of giving NaN (as Hugging Face's models do).
    """
    bias = None
    if keep is not None and keep.is_floating_point():  # already an additive bias (MPNet's positions)
        bias = keep.to(q.dtype)
    elif keep is not None:
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~keep, torch.finfo(q.dtype).min
        )
    if not uses_math(q):
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if bias is None and causal:
        t = q.shape[-2]
        causal_keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(t, t, dtype=q.dtype, device=q.device).masked_fill_(
            ~causal_keep, torch.finfo(q.dtype).min
        )
    # In-place scale and mask: the product's output is not needed by its backward pass.
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)

"""`--precision int8`: a training step's frozen products in int8, for x86 CPUs without fast bf16.

fbgemm's int8 products (AVX2 `vpmaddubsw`) ran GPT-2 / BERT-base projection shapes 1.6-2.3x faster than fp32
on a 2-core fp32-only AMD EPYC. Each frozen linear keeps its fp32 weight and gains two int8 copies, one per
output row of W (the forward, `x · Wᵀ`) and one per output row of Wᵀ (the backward, `dy · W`: the frozen
weight gets no gradient, so that is all it needs). The LoRA adapters, the head, LayerNorms, attention and the
optimizer stay fp32, and so does everything outside a training step (evaluation, prediction, serving).

What it costs in accuracy (benchmarks/int8_step.py, against fp32; bf16 autocast for scale): fbgemm quantises
an activation per tensor to 7 bits, which pretrained models' outlier features ruin (MiniLM's LoRA gradients
at cosine 0.68). So each row is scaled to the same maximum first (per-token quantisation), and input columns
whose values exceed `OUTLIER_THRESHOLD` run in fp32 (LLM.int8's split, Dettmers et al., 2022): MiniLM's
logits within 4.8 % and LoRA gradients at cosine 0.995 (bf16: 1.2 %, 0.9999).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

OUTLIER_THRESHOLD = 6.0  # LLM.int8's: an input column with a value above it is multiplied in fp32


def int8_available() -> bool:
    """Whether this torch build has fbgemm's int8 products (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack_int8(weight: torch.Tensor):
    """fbgemm's prepacked int8 copy of `weight` (out, in): symmetric, one scale per output row."""
    scale = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
    zero = torch.zeros(len(weight), dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 marks quantised tensors deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(quantized, None)


def int8_copies(owner: nn.Module, weight: torch.Tensor) -> tuple:
    """(int8 W, int8 Wᵀ) for `weight` (the module's own, or a fused view over several), packed on first use
    and again when the weight changed in place (`weight._version`: a LoRA merge)."""
    cache = owner.__dict__.setdefault("_int8_packs", {})
    key = (weight.data_ptr(), tuple(weight.shape))
    entry = cache.get(key)
    if entry is None or entry[0] != weight._version:
        with torch.no_grad():
            w = weight.detach().contiguous()
            entry = cache[key] = (weight._version, pack_int8(w), pack_int8(w.T.contiguous()))
    return entry[1:]


def int8_product(x: torch.Tensor, packed, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """`x · Wᵀ` in int8, each row of x scaled to a maximum of 1 first so fbgemm's per-tensor quantisation
    acts per row (a row of small gradients is not rounded to zero by another row's large ones).
    `magnitude`: `x.abs()` where the caller has it already."""
    magnitude = x.abs() if magnitude is None else magnitude
    scale = magnitude.amax(1, keepdim=True).clamp_min(1e-30)
    return torch.ops.quantized.linear_dynamic(x / scale, packed, True).mul_(scale)


class _Int8Product(torch.autograd.Function):
    """`x · Wᵀ` for a frozen fp32 W, forward and backward in int8; outlier columns of x in fp32."""

    @staticmethod
    def forward(ctx, x, weight, packed, packed_t):
        ctx.packed_t = packed_t
        magnitude = x.abs()  # one pass for the outlier columns and the rows' scales
        columns = (magnitude.amax(0) > OUTLIER_THRESHOLD).nonzero().flatten()
        if len(columns) == 0:
            return int8_product(x, packed, magnitude)
        inliers = int8_product(x.index_fill(1, columns, 0.0), packed, magnitude.index_fill(1, columns, 0.0))
        return inliers.addmm_(x[:, columns], weight[:, columns].T)

    @staticmethod
    def backward(ctx, grad):
        return int8_product(grad.contiguous(), ctx.packed_t), None, None, None


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, owner: nn.Module
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: in int8 while autograd records (a training step) and the weight is a
    frozen fp32 one, else exactly `F.linear`. `owner` keeps the int8 copies."""
    if (
        not torch.is_grad_enabled()
        or weight.requires_grad
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or x.numel() == 0
    ):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = _Int8Product.apply(flat, weight, *int8_copies(owner, weight))
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Linear):
    """An `nn.Linear` whose frozen products run in int8 during training steps (`int8_linear`). Made by
    `use_int8_products` (a class change: parameters and state dict are untouched)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.bias, self)


def use_int8_products(model: nn.Module) -> int:
    """Turn every frozen fp32 `nn.Linear` of `model` into an `Int8Linear`; returns how many."""
    count = 0
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and not module.weight.requires_grad
            and module.weight.dtype == torch.float32
        ):
            module.__class__ = Int8Linear
            count += 1
    return count

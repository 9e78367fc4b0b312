"""LoRA: low-rank updates on frozen linears (Hu et al., 2021), with PEFT's semantics.

`LoRALinear` computes `base(x) + (alpha / r) · dropout(x) · A · B` with `A` (in × r, Kaiming-uniform)
and `B` (r × out, zeros), so a freshly adapted model computes exactly what the base model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import LORA_TARGET_MODULES, LoRAConfig
from .devices import to_autocast_dtype
from .errors import LorafitError


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise LorafitError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.A = nn.Parameter(torch.empty(base.in_features, rank, **factory))
        self.B = nn.Parameter(torch.zeros(rank, base.out_features, **factory))
        if not self.A.is_meta:
            # Same as nn.Linear's (and PEFT's) init of lora_A, whose weight is A transposed.
            nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update `scaling · (A·B)ᵀ`, in `nn.Linear`'s (out, in) layout."""
        return (self.A @ self.B).T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocasting = torch.is_autocast_enabled(x.device.type)
        if not self.merged:
            x = to_autocast_dtype(x)  # once for both products
        result = self.base(x)
        if self.merged:
            return result
        x = self.dropout(x)
        if autocasting or x.dtype == result.dtype == self.A.dtype:
            # One product-and-add, `result + scaling · (x A) B`, instead of a product, a scaling and an add
            # over the whole output (measured: 3.6 % off a GPT-2 124M training step in fp32). Under
            # autocast its products run in bf16; x is not copied to fp32 first (profiled on an AMX CPU:
            # that copy, cast straight back, cost 28 ms of a 174 ms GPT-2 forward).
            inner = x.reshape(-1, x.shape[-1]) @ self.A
            flat = result.reshape(-1, result.shape[-1])
            return torch.addmm(flat, inner, self.B, alpha=self.scaling).view(result.shape)
        # A bf16 base outside autocast: the update in the adapter's dtype (fp32), cast to the output's.
        update = (x.to(self.A.dtype) @ self.A) @ self.B
        return result + (update * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


def _get_submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, module)


def validate_lora_config(config: LoRAConfig, n_blocks: int) -> None:
    """Raise LorafitError on a LoRA setting that cannot work (rank 0, unknown target, block out of range)."""
    if config.rank < 1:
        raise LorafitError(f"--lora-rank must be at least 1, got {config.rank}")
    if config.alpha <= 0:
        raise LorafitError(f"--lora-alpha must be positive, got {config.alpha}")
    if not 0 <= config.dropout < 1:
        raise LorafitError(f"--lora-dropout must be in [0, 1), got {config.dropout}")
    unknown = [t for t in config.targets if t not in LORA_TARGET_MODULES]
    if unknown or not config.targets:
        raise LorafitError(
            f"--lora-targets: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(LORA_TARGET_MODULES)}"
        )
    bad = [b for b in (config.blocks or []) if not -n_blocks <= b < n_blocks]
    if bad:
        raise LorafitError(f"--lora-blocks: block {bad[0]} does not exist (the model has {n_blocks} blocks)")


def lora_block_indices(config: LoRAConfig, n_blocks: int) -> list[int]:
    """The (non-negative, sorted) indices of the blocks LoRA adapts."""
    if config.blocks is None:
        return list(range(n_blocks))
    return sorted({b % n_blocks for b in config.blocks})


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model`, then wrap the chosen linears of the chosen blocks in `LoRALinear`.

    `model` (or `model.backbone`) must have a `blocks` ModuleList whose blocks use the attribute names in
    `LORA_TARGET_MODULES`. Returns `model`, changed in place.
    """
    backbone = getattr(model, "backbone", model)
    validate_lora_config(config, len(backbone.blocks))
    model.requires_grad_(False)
    for i in lora_block_indices(config, len(backbone.blocks)):
        block = backbone.blocks[i]
        for target in config.targets:
            path = LORA_TARGET_MODULES[target]
            linear = _get_submodule(block, path)
            if isinstance(linear, LoRALinear):
                continue
            key = f"blocks.{i}.{path}"
            rank = config.rank_pattern.get(key, config.rank)
            alpha = config.alpha_pattern.get(key, config.alpha)
            _set_submodule(block, path, LoRALinear(linear, rank, alpha, config.dropout))
    for path in config.modules_to_save:
        try:
            _get_submodule(backbone, path).requires_grad_(True)
        except AttributeError:
            raise LorafitError(f"modules_to_save: the model has no module {path!r}") from None
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (for fast inference); `unmerge_lora` undoes it."""
    for module in lora_modules(model):
        module.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the LoRA updates folded in by `merge_lora`."""
    for module in lora_modules(model):
        module.unmerge()
    return model


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "fraction": self.fraction}


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting a tied weight once per place it is used.

    GPT-2's LM head shares its matrix with the token embedding; the reference lab's model keeps a
    separate copy, so counting per use (`remove_duplicate=False`) reproduces the lab's totals.
    """
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )

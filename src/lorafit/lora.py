"""LoRA: low-rank updates on frozen linears (Hu et al., 2021), with PEFT's semantics.

`LoRALinear` computes `base(x) + (alpha / r) · dropout(x) · A · B` with `A` (in × r, Kaiming-uniform)
and `B` (r × out, zeros), so a freshly adapted model computes exactly what the base model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LORA_TARGET_MODULES, LoRAConfig
from .devices import to_autocast_dtype
from .errors import LorafitError
from .int8 import Int8Linear, int8_linear


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


# Query, key and value share their input: their frozen weights are stored as adjacent rows of one tensor
# (`fuse_shared_input_weights`) and computed as one product, with one product for their three LoRA `A`
# and one for their `B` (`project_shared_input`). On a 2-core AMX Xeon (bf16, GPT-2 124M, the SMS
# epoch's batches) a warm training step went from 253.5 to 237.9 ms (interleaved); a cold first epoch, whose
# new batch shapes each cost the fused products' kernels too, gained ~2 %. False: one product each.
_fuse_shared_input = True


def set_fused_projections(enabled: bool) -> None:
    """Turn the one-product query / key / value path on (default) or off, for this process."""
    global _fuse_shared_input
    _fuse_shared_input = enabled


def _frozen_linear(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, LoRALinear) else module


def _adjacent_rows(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One tensor spanning `tensors` when they are contiguous, consecutive pieces of one storage (what
    `fuse_shared_input_weights` makes them), else None. A view: nothing is copied."""
    first = tensors[0]
    if first is None or any(t is None for t in tensors) or torch.compiler.is_compiling():
        return None  # storage pointers do not trace: under torch.compile, one product each
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != offset
            or t.dtype != first.dtype
            or t.shape[1:] != first.shape[1:]
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


@torch.no_grad()
def fuse_shared_input_weights(model: nn.Module) -> None:
    """Store each attention's frozen query, key and value weights (and biases) as adjacent rows of one
    tensor, the parameters becoming views of it, so `project_shared_input` multiplies once. Call it again
    after anything that gives the weights new storage (a dtype cast, a move to another device); until then
    the projections run one product each, as before. Trainable bases (full fine-tuning) are left alone."""
    with torch.inference_mode(False):  # views made here must be usable by autograd later
        for module in model.modules():
            linears = [getattr(module, name, None) for name in ("query", "key", "value")]
            if not all(isinstance(m, nn.Module) for m in linears):
                continue
            bases = [_frozen_linear(m) for m in linears]
            if any(not isinstance(b, nn.Linear) or b.weight.requires_grad for b in bases):
                continue
            for name in ("weight", "bias"):
                params = [getattr(b, name) for b in bases]
                if any(p is None for p in params) or _adjacent_rows(params) is not None:
                    continue
                if any(p.requires_grad or p.dtype != params[0].dtype for p in params):
                    continue
                fused = torch.cat([p.detach() for p in params])
                for p, rows in zip(params, fused.split([len(p) for p in params])):
                    p.data = rows


def _fusable(linears: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether `project_shared_input` computes exactly what the modules would, one by one."""
    autocasting = torch.is_autocast_enabled(x.device.type)
    for m in linears:
        if any(p.requires_grad for p in _frozen_linear(m).parameters(recurse=False)):
            return False  # a trainable base needs gradients of its own
        if isinstance(m, LoRALinear) and not m.merged:
            if m.training and not isinstance(m.dropout, nn.Identity):
                return False  # each projection draws its own dropout mask
            if not autocasting and not (x.dtype == m.base.weight.dtype == m.A.dtype):
                return False
        elif not isinstance(_frozen_linear(m), nn.Linear):
            return False
    return True


def project_shared_input(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """`[m(x) for m in linears]` (nn.Linear or LoRALinear) computed as one frozen product over their
    adjacent weights plus, for the unmerged adapters among them, one `x·A` and one product-and-add with
    their `B` blocks laid side by side (zeros elsewhere): the same sums, in 2-3 products instead of 3-9.
    Falls back to one call each where the weights are not adjacent or a projection needs its own path."""
    bases = [_frozen_linear(m) for m in linears]
    weight = _adjacent_rows([b.weight for b in bases]) if _fuse_shared_input else None
    bias = _adjacent_rows([b.bias for b in bases]) if weight is not None else None
    if (
        weight is None
        or (bias is None and any(b.bias is not None for b in bases))
        or not _fusable(linears, x)
    ):
        return [m(x) for m in linears]
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(bases[0], Int8Linear):  # --precision int8: the fused product in int8 too
        out = int8_linear(flat, weight, bias, bases[0])
    else:
        out = F.linear(flat, weight, bias)
    sizes = [b.out_features for b in bases]
    adapters = [(i, m) for i, m in enumerate(linears) if isinstance(m, LoRALinear) and not m.merged]
    if adapters:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        a = torch.cat([m.A for _, m in adapters], dim=1)
        b = torch.cat(
            [F.pad(m.B * m.scaling, (starts[i], total - starts[i] - sizes[i])) for i, m in adapters]
        )
        out = torch.addmm(out, flat @ a, b)  # under autocast in its dtype; else all in x's (`_fusable`)
    return list(out.view(*x.shape[:-1], out.shape[-1]).split(sizes, dim=-1))


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

"""Data-parallel training with `torch.distributed` when launched by `torchrun` (NCCL on CUDA, Gloo on CPU).

Without torchrun (no `WORLD_SIZE` in the environment) every function here is the single-process identity,
so `lorafit train` behaves as it always did.

How a global batch is shared: every rank builds the same length-aware batches (same seed), and rank r
takes rows r, r + W, r + 2W, ... of each global batch (W ranks), so the ranks see disjoint rows of
similar length. Each rank's loss is its rows' summed cross-entropy × W / (global batch size); DDP averages
gradients over the W ranks, which gives exactly the gradient of the global batch's mean loss, even when
the last batch does not split evenly.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import torch

from .errors import LorafitError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init(device_name: str) -> torch.device:
    """Join the process group torchrun set up; returns this rank's device (`cuda:LOCAL_RANK` or CPU).

    Collectives time out after `LORAFIT_DIST_TIMEOUT` seconds (default 600), so a rank that died or
    hangs brings the job down instead of blocking the others forever."""
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=float(os.environ.get("LORAFIT_DIST_TIMEOUT", "600")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def shutdown() -> None:
    """Leave the process group together: every rank waits at a barrier (the others' last collective,
    rank 0's writing) before any tears its connections down. Without it, a rank that finished first and
    exited while rank 0 still wrote its file aborted once in CI ("terminate called without an active
    exception", `predict` under torchrun, 2026-12-07; not reproduced in 26 runs here)."""
    if is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def check_same_settings(settings: dict, what: str = "settings") -> None:
    """Refuse to start when the ranks were launched with different settings (or see different data)."""
    if world_size() == 1:
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, (digest, settings))
    for other_rank, (other_digest, other) in enumerate(everyone):
        if other_digest != everyone[0][0]:
            key = next(
                (
                    k
                    for k in sorted(set(other) | set(everyone[0][1]))
                    if other.get(k) != everyone[0][1].get(k)
                ),
                "?",
            )
            raise LorafitError(
                f"rank {other_rank} was started with other {what} than rank 0 ({key}: "
                f"{other.get(key)!r} vs {everyone[0][1].get(key)!r}); launch every rank with the same command"
            )


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (exact counts, not averages of averages)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def my_share(rows: Sequence) -> list:
    """This rank's rows of one global batch (rows r, r + W, ...)."""
    return list(rows[rank() :: world_size()])


def sharded_logits(
    compute: Callable[[list[int]], torch.Tensor], n: int, num_classes: int, device: torch.device
) -> torch.Tensor:
    """Logits of rows 0..n-1, each rank computing `compute(indices)` for its share; every rank gets all."""
    if world_size() == 1:
        return compute(list(range(n)))
    size, me = world_size(), rank()
    mine = list(range(me, n, size))
    padded = torch.zeros(len(range(0, n, size)), num_classes, dtype=torch.float32, device=device)
    if mine:
        padded[: len(mine)] = compute(mine).to(device)
    gathered = [torch.zeros_like(padded) for _ in range(size)]
    torch.distributed.all_gather(gathered, padded)
    logits = torch.empty(n, num_classes)
    for r, part in enumerate(gathered):
        logits[r::size] = part[: len(range(r, n, size))].cpu()
    return logits


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel under torchrun (it all-reduces the trainable tensors'
    gradients), else `model` itself."""
    if world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def my_rows(batch: Sequence[int]) -> tuple[list[int], float]:
    """This rank's rows of a global batch and its loss weight: a rank left without rows (a last batch smaller
    than the world) still computes a row, weighted 0, so that it joins the gradient all-reduce."""
    rows = my_share(batch) if world_size() > 1 else list(batch)
    return (rows, 1.0) if rows else (list(batch[:1]), 0.0)


def loss_scale(batch_size: int, grad_accum: int, weight: float) -> float | None:
    """What a rank's summed loss is multiplied by before backward (None in one process: the plain mean)."""
    if world_size() == 1:
        return None
    return world_size() * weight / batch_size / grad_accum


def global_sum(value: float, device: torch.device) -> float:
    return all_reduce_sum([value], device)[0]


def sum_to_main(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over ranks on rank 0, zeros on the others (for counts that rank 0 saves and counts on)."""
    if world_size() == 1:
        return list(values)
    total = all_reduce_sum(values, device)
    return total if is_main() else [0.0] * len(total)

"""Training loop, evaluation and metrics."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batching import collate, collate_packed, epoch_batches, sorted_batches
from .config import TrainConfig
from .errors import LorafitError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the reference lab seeds torch only; we seed all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorafitError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafitError(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 where the hardware has fast bf16 matrix units, else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise LorafitError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the matrix products; a no-op in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen linear weights and the frozen token-embedding tables (GPT-2's `wte`, BERT's
    `word_embeddings`: a third of GPT-2 small) in `dtype`. bf16 halves their memory and skips a cast per
    step. Position embeddings, LayerNorms and every trainable parameter stay fp32; the models add the
    token embeddings in the position table's dtype, so the residual stream stays fp32."""
    for name, module in model.named_modules():
        token_table = isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in (
            "wte",
            "word_embeddings",
        )
        if (isinstance(module, nn.Linear) or token_table) and not module.weight.requires_grad:
            module.to(dtype)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (n × classes, fp32, in the order of `rows`), computed in length-sorted batches."""
    was_training = model.training
    model.eval()
    logits = torch.empty(len(rows), model.head.out_features)
    for batch in tqdm(
        sorted_batches([len(r) for r in rows], batch_size), desc=desc, leave=False, disable=not progress
    ):
        input_ids, attention_mask = collate([rows[i] for i in batch], pad_id)
        with autocast(device, precision):
            out = model(input_ids.to(device), attention_mask.to(device))
        logits[torch.as_tensor(batch)] = out.float().cpu()
    model.train(was_training)
    return logits


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix (rows: true, columns: predicted)."""
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
    return {
        "accuracy": float(np.trace(matrix)) / total if total else 0.0,
        "count": total,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def evaluate(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    labels: Sequence[int],
    label_names: Sequence[str],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Loss and classification metrics of `model` on one split (under torchrun: each rank scores its
    share of the rows, and the metrics come from all the logits, exactly as in one process)."""

    def compute(indices: list[int]) -> torch.Tensor:
        return predict_logits(
            model, [rows[i] for i in indices], pad_id=pad_id, batch_size=batch_size, device=device,
            precision=precision, progress=progress and distributed.is_main(), desc=desc,
        )  # fmt: skip

    logits = distributed.sharded_logits(compute, len(rows), model.head.out_features, device)
    return metrics_from_logits(logits, labels, label_names)


def metrics_from_logits(logits: torch.Tensor, labels: Sequence[int], label_names: Sequence[str]) -> dict:
    """`classification_metrics` of the argmax predictions, plus the mean cross-entropy `loss`."""
    targets = torch.as_tensor(list(labels), dtype=torch.long)
    metrics = classification_metrics(targets.tolist(), logits.argmax(-1).tolist(), label_names)
    metrics["loss"] = F.cross_entropy(logits, targets).item() if len(targets) else float("nan")
    return metrics


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: float):
    """Learning-rate schedule over optimiser steps: linear warm-up, then constant, linear or cosine decay."""
    warmup_steps = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    if kind not in ("constant", "linear", "cosine"):
        raise LorafitError(f"--scheduler must be constant, linear or cosine, got {kind!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Split:
    """One split, tokenized: token ids per row and class ids."""

    rows: list[list[int]]
    labels: list[int]
    texts: list[str] = field(default_factory=list)


def packs_batches(config: TrainConfig) -> bool:
    """Whether `fit` packs its batches: `packing`, unless `bucketing` is off (the reference's padding)."""
    return config.packing and config.bucketing


def training_batches(train: Split, config: TrainConfig, epoch: int) -> list[np.ndarray]:
    """The batches (arrays of row indices) `fit` trains on in `epoch`, as `config` says to build them."""
    # Packing changes how a batch is laid out, not which rows it holds.
    return epoch_batches(
        [len(r) for r in train.rows], config.batch_size, seed=config.seed, epoch=epoch,
        bucketing=config.bucketing, window_batches=config.bucket_batches,
        labels=train.labels if config.mix_classes else None,
    )  # fmt: skip


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    label_names: Sequence[str],
    config: TrainConfig,
    *,
    pad_id: int,
    device: torch.device,
    precision: str,
    pad_to: int | None = None,
    on_record: Callable[[dict], None] = lambda record: None,
    print_fn: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    resume: dict | None = None,
) -> list[dict]:
    """Train the trainable parameters of `model` on `train`, validating after each epoch.

    Prints the lab's lines (`Epoch 1 | Batch 10 | Loss: 1.2277` every `log_every` batches, then the epoch
    summary and the validation result) with `print_fn` (default: `tqdm.write`), hands each record to
    `on_record`, and returns one dict per epoch.
    With `keep_best`, the trainable weights of the epoch with the lowest validation loss are restored.

    `checkpoint(state)` is called at each epoch end and, when `checkpoint_every` > 0, at the first optimiser
    step after every `checkpoint_every` batches; `state` (tensors, numbers, lists: `torch.save`-able and
    loadable with `weights_only=True`) passed back as `resume` continues training exactly where it was.
    """
    world = distributed.world_size()
    if print_fn is None:
        print_fn = tqdm.write  # above the progress bar, not through it
    if not distributed.is_main():
        print_fn = lambda line: None  # noqa: E731  (only rank 0 prints)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    # No weight decay on biases and LayerNorm weights (as GPT-2 and BERT were trained).
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        foreach=True,  # one fused loop over the many small LoRA tensors (the default on CPU is a Python loop)
    )
    batches_per_epoch = math.ceil(len(train.rows) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    scheduler = make_scheduler(optimizer, config.scheduler, steps_per_epoch * config.epochs, config.warmup)
    history: list[dict] = []
    best_loss, best_state = float("inf"), None
    # The moving average of the trainable weights (`ema`), updated after every optimiser step; the model
    # holds it while it is validated and after training, the raw weights while it trains.
    average = [p.detach().clone() for p in trainable] if config.ema else None
    updates = 0
    # Where training stands: the next epoch, batches of it already done, and that epoch's running sums.
    epoch, done, loss_sum, correct, seen, elapsed = 1, 0, 0.0, 0, 0, 0.0

    # Under torchrun, DDP all-reduces the gradients of the trainable parameters (see distributed.py).
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    def global_sums(*values: float) -> list[float]:
        return distributed.all_reduce_sum(values, device)

    if resume is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(resume["trainable"][name])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
        best_loss = resume["best_loss"]
        best_state = resume["best_state"]
        if average is not None:
            average = [resume["ema"][name] for name, _ in named]
            updates = resume["ema_updates"]
        epoch, done = resume["epoch"], resume["batch"]
        loss_sum, correct, seen, elapsed = (
            resume["loss_sum"],
            resume["correct"],
            resume["seen"],
            resume["elapsed"],
        )
        if not distributed.is_main():  # the checkpoint holds the sums over all ranks; count them once
            loss_sum, correct, seen = 0.0, 0, 0

    def state(epoch: int, batch: int, elapsed: float) -> dict:
        return {
            "epoch": epoch,
            "batch": batch,
            "trainable": {name: p.detach().clone() for name, p in named},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "best_loss": best_loss,
            "best_state": best_state,
            "loss_sum": loss_sum,
            "correct": correct,
            "seen": seen,
            "elapsed": elapsed,
            "ema": {name: a.clone() for (name, _), a in zip(named, average)} if average is not None else {},
            "ema_updates": updates,
        }

    def swap_average() -> None:
        """Exchange the model's trainable weights with the moving average (twice: back as they were)."""
        with torch.no_grad():
            for p, a in zip(trainable, average):
                scratch = p.detach().clone()
                p.copy_(a)
                a.copy_(scratch)

    while epoch <= config.epochs:
        model.train()
        batches = training_batches(train, config, epoch)
        start = time.perf_counter() - elapsed
        since_checkpoint = 0
        bar = tqdm(
            total=len(batches), initial=done, desc=f"Epoch {epoch}/{config.epochs}", unit="batch", leave=False,
            disable=not distributed.is_main(),
        )  # fmt: skip
        for index, batch in enumerate(batches[done:], start=done + 1):
            rows = distributed.my_share(batch) if world > 1 else list(batch)
            # A rank left without rows (a last batch smaller than the world) still joins the all-reduce.
            weight = 1.0 if rows else 0.0
            rows = rows or list(batch[:1])
            targets = torch.as_tensor([train.labels[i] for i in rows], dtype=torch.long, device=device)
            if packs_batches(config):
                packed = collate_packed([train.rows[i] for i in rows], pad_id)
                inputs = (packed[0].to(device), None, packed[1].to(device), packed[2].to(device))
            else:
                input_ids, attention_mask = collate([train.rows[i] for i in rows], pad_id, pad_to)
                inputs = (input_ids.to(device), attention_mask.to(device))
            with autocast(device, precision):
                logits = forward(*inputs)
            if world == 1:
                loss = F.cross_entropy(logits.float(), targets)
                (loss / config.grad_accum).backward()
                batch_loss = loss.item()
                batch_loss_sum = batch_loss * len(rows)
            else:
                summed = F.cross_entropy(logits.float(), targets, reduction="sum") * weight
                (summed * world / len(batch) / config.grad_accum).backward()
                batch_loss_sum = summed.item()
                batch_loss = batch_loss_sum / len(rows)
            stepped = index % config.grad_accum == 0 or index == len(batches)
            if stepped:
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if average is not None:
                    # Warm-up as TensorFlow's ExponentialMovingAverage: early on the average forgets
                    # faster, so it does not stay anchored at the initial weights.
                    updates += 1
                    decay = min(config.ema, (1 + updates) / (10 + updates))
                    with torch.no_grad():
                        torch._foreach_lerp_(average, [p.detach() for p in trainable], 1 - decay)
            loss_sum += batch_loss_sum
            correct += int((logits.argmax(-1) == targets).sum()) * int(weight)
            seen += len(rows) * int(weight)
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}", acc=f"{correct / max(seen, 1):.2%}")
            if index % config.log_every == 0:
                if world > 1:  # the global batch's mean loss, as one process would log it
                    batch_loss = global_sums(batch_loss_sum)[0] / len(batch)
                print_fn(f"Epoch {epoch} | Batch {index} | Loss: {batch_loss:.4f}")
                on_record({"type": "batch", "epoch": epoch, "batch": index, "loss": batch_loss})
            since_checkpoint += 1
            if checkpoint and checkpoint_every and stepped and since_checkpoint >= checkpoint_every:
                if index < len(batches):  # the epoch end checkpoints anyway, after validation
                    if world > 1:  # the checkpoint holds the sums over all ranks, kept by rank 0
                        loss_sum, correct, seen = global_sums(loss_sum, correct, seen)
                        correct, seen = int(correct), int(seen)
                        snapshot = state(epoch, index, time.perf_counter() - start)
                        if not distributed.is_main():
                            loss_sum, correct, seen = 0.0, 0, 0
                        checkpoint(snapshot)
                    else:
                        checkpoint(state(epoch, index, time.perf_counter() - start))
                since_checkpoint = 0
        bar.close()
        if world > 1:
            loss_sum, correct, seen = global_sums(loss_sum, correct, seen)
        seconds = time.perf_counter() - start
        train_loss, train_accuracy = loss_sum / seen, correct / seen
        print_fn(
            f"Epoch {epoch} Finished | Avg Loss: {train_loss:.4f} | Acc: {train_accuracy:.2%} | Time: {seconds:.2f}s"
        )
        if average is not None:
            swap_average()  # validate (and keep) the average
        result = evaluate(
            model, val.rows, val.labels, label_names, pad_id=pad_id, batch_size=config.eval_batch_size,
            device=device, precision=precision,
        )  # fmt: skip
        print_fn(f"Validation | Loss: {result['loss']:.4f} | Acc: {result['accuracy']:.2%}")
        record = {
            "epoch": epoch,
            "seconds": seconds,
            "batches": len(batches),
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": result["loss"],
            "val_accuracy": result["accuracy"],
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(record)
        on_record({"type": "epoch", **record})
        if config.keep_best and result["loss"] < best_loss:
            best_loss = result["loss"]
            best_state = {name: p.detach().clone() for name, p in named}
        if average is not None and epoch < config.epochs:
            swap_average()  # back to the raw weights to train on; after the last epoch the average stays
        epoch, done, loss_sum, correct, seen, elapsed = epoch + 1, 0, 0.0, 0, 0, 0.0
        if checkpoint:
            checkpoint(state(epoch, 0, 0.0))
    if config.keep_best and best_state is not None and len(history) > 1:
        best = min(history, key=lambda r: r["val_loss"])
        with torch.no_grad():
            for name, p in named:
                p.copy_(best_state[name])
        print_fn(f"Keeping epoch {best['epoch']} (lowest validation loss {best_loss:.4f})")
    return history

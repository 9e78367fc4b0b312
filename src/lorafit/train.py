"""Training loop, evaluation and metrics."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batching import collate, collate_packed, epoch_batches, packed_width, sorted_batches
from .config import INFERENCE_MAX_TOKENS, TrainConfig
from .devices import autocast
from .errors import LorafitError
from .metrics import metrics_from_logits, unseen_accuracy
from .streams import run_parallel, split_evenly, stream_count

# Inference rounds packed widths up to a multiple of this in bf16 and fp16, and the server in any precision:
# a long-lived process (a server, a million-row predict) then meets a few dozen batch shapes instead of
# hundreds, and oneDNN's per-shape kernels and the allocator's per-shape blocks stop growing its memory
# (benchmarks/README.md, "Serving"). fp32 batch inference (evaluation, `predict`) packs rows of any width:
# its products run on MKL, which builds nothing per shape (SMS test set: 3.0 % padding instead of 6.9 %).
INFERENCE_WIDTH_MULTIPLE = 16
# Training packs rows to a multiple of this in bf16 and fp16 (`--packed-width fit`, or `fit16` in any
# precision). Each new batch shape costs oneDNN kernels that stay cached; on the GPT-2 124M SMS epoch (bf16)
# multiples of 8 / 16 / 32 gave 5.0 / 7.3 / 6.3 % padding, 39 / 28 / 22 shapes, 60 / 63 / 67 s and a peak
# RSS of 1,400 / 1,260 / 1,180 MiB (as wide as the longest text: 14.5 % padding). fp32 products on a CPU
# (MKL) have no per-shape kernels to build, so fp32 packs rows of any width: 1.9 % padding, 90 shapes.
TRAIN_WIDTH_MULTIPLE = 16
# Precisions whose products build nothing per shape: fp32 (MKL), and int8 (fbgemm packs each call's input;
# its evaluation runs in fp32).
FP32_PRODUCTS = ("fp32", "int8")


def train_width_multiple(config: TrainConfig, precision: str) -> int | None:
    """The multiple packed training rows are rounded up to (see above); None: as wide as the longest text."""
    if config.packed_width == "longest":
        return None
    return 1 if config.packed_width == "fit" and precision in FP32_PRODUCTS else TRAIN_WIDTH_MULTIPLE


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the reference lab seeds torch only; we seed all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    packing: bool = True,
    width_multiple: int | None = None,
    streams: int | None = None,
    max_tokens: int | None = INFERENCE_MAX_TOKENS,
) -> torch.Tensor:
    """Logits (n × classes, fp32, in the order of `rows`), computed in length-sorted batches of at most
    `batch_size` texts and `max_tokens` tokens (None: no cap), each packed into rows of the cheapest
    multiple of `width_multiple` (`packing`, exactly what the padded batch computes, with fewer tokens;
    default 1 in fp32, else `INFERENCE_WIDTH_MULTIPLE`), or padded to its longest text. Under bf16
    autocast, unless the model was cast whole for inference (`devices.cast_for_inference`). `streams`
    threads (default `--streams`, `streams.stream_count`) each score an even share of the rows in their
    own batches."""
    if width_multiple is None:
        width_multiple = 1 if precision in FP32_PRODUCTS else INFERENCE_WIDTH_MULTIPLE
    was_training = model.training
    # `eval()` walks every module (about 4 ms a batch in a server, py-spy): only when it changes something.
    if was_training:
        model.eval()
    logits = torch.empty(len(rows), model.head.out_features)
    lengths = [len(r) for r in rows]
    share_batches = [
        [np.asarray(share)[b] for b in sorted_batches([lengths[i] for i in share], batch_size, max_tokens)]
        for share in split_evenly(range(len(rows)), lengths, streams or stream_count(device))
    ]
    bar = progress_bar(total=sum(map(len, share_batches)), desc=desc, leave=False, disable=not progress)
    lock = threading.Lock()

    def score(batches: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():  # grad mode is per thread
                for batch in batches:
                    out = _batch_logits(model, [rows[i] for i in batch], pad_id, device, precision,
                                        packing, width_multiple)  # fmt: skip
                    logits[torch.as_tensor(batch)] = out
                    with lock:
                        bar.update(1)

        return run

    run_parallel([score(batches) for batches in share_batches])
    bar.close()
    if was_training:
        model.train()
    return logits


def _batch_logits(model, texts, pad_id, device, precision, packing, width_multiple) -> torch.Tensor:
    """One inference batch's fp32 logits on the CPU."""
    if packing and len(texts) > 1:
        width = packed_width([len(t) for t in texts], width_multiple)
        input_ids, positions, segments = collate_packed(texts, pad_id, width=width)
        inputs = (input_ids.to(device), None, positions.to(device), segments.to(device))
    else:
        input_ids, attention_mask = collate(texts, pad_id)
        inputs = (input_ids.to(device), attention_mask.to(device))
    with contextlib.nullcontext() if model.bf16_inference else autocast(device, precision):
        return model(*inputs).float().cpu()


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
    seen: Sequence[bool] | None = None,
) -> dict:
    """Loss and classification metrics of `model` on one split (under torchrun: each rank scores its
    share of the rows, and the metrics come from all the logits, exactly as in one process). With `seen`
    (per row: does its text also occur in the training split?) and any row seen, "unseen" holds the
    accuracy on the others (`metrics.unseen_accuracy`)."""

    def compute(indices: list[int]) -> torch.Tensor:
        return predict_logits(
            model, [rows[i] for i in indices], pad_id=pad_id, batch_size=batch_size, device=device,
            precision=precision, progress=progress and distributed.is_main(), desc=desc,
        )  # fmt: skip

    logits = distributed.sharded_logits(compute, len(rows), model.head.out_features, device)
    metrics = metrics_from_logits(logits, labels, label_names)
    if seen is not None and (unseen := unseen_accuracy(logits, labels, seen)) is not None:
        metrics["unseen"] = unseen
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


class ExponentialAverage:
    """An exponential moving average of the trainable tensors (`--ema DECAY`), updated after every optimiser
    step and warmed up as TensorFlow's ExponentialMovingAverage: the decay is min(DECAY, (1 + n) / (10 + n))
    at update n, so early on the average forgets faster instead of staying anchored at the initial weights.
    (`torch.optim.swa_utils.AveragedModel` copies the whole model, frozen base included, and has no warm-up.)"""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.average = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's tensors with the average (twice: back as they were)."""
        for p, a in zip(self.params, self.average):
            scratch = p.detach().clone()
            p.copy_(a)
            a.copy_(scratch)


class TrainState:
    """Where training stands, as a checkpoint holds it: the next epoch and the batches of it done, that
    epoch's running sums, the history, the best epoch so far, and (with `state_dict`) the trainable
    tensors, optimiser, scheduler, RNG and moving average."""

    def __init__(
        self, named: list[tuple[str, nn.Parameter]], optimizer, scheduler, ema: ExponentialAverage | None
    ):
        self.named, self.optimizer, self.scheduler, self.ema = named, optimizer, scheduler, ema
        self.history: list[dict] = []
        self.best_loss, self.best_state = float("inf"), None
        self.epoch = 1
        self.start_epoch(self.epoch)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0
        self.loss_sum, self.correct, self.seen, self.elapsed = 0.0, 0, 0, 0.0

    def state_dict(self) -> dict:
        """Tensors, numbers and lists only: `torch.save`-able and loadable with `weights_only=True`."""
        named_average = zip(self.named, self.ema.average) if self.ema else []
        return {
            "epoch": self.epoch, "batch": self.batch,
            "trainable": {name: p.detach().clone() for name, p in self.named},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "history": self.history,
            "best_loss": self.best_loss, "best_state": self.best_state,
            "loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "elapsed": self.elapsed,
            "ema": {name: a.clone() for (name, _), a in named_average}, "ema_updates": self.ema.updates if self.ema else 0,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]
        if self.ema:
            self.ema.average = [state["ema"][name] for name, _ in self.named]
            self.ema.updates = state["ema_updates"]
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.loss_sum, self.correct, self.seen = state["loss_sum"], state["correct"], state["seen"]
        self.elapsed = state["elapsed"]
        if not distributed.is_main():  # the checkpoint holds the sums over all ranks; count them once
            self.loss_sum, self.correct, self.seen = 0.0, 0, 0


def fused_or_foreach(params: list[nn.Parameter]) -> dict:
    """AdamW's `fused=True` where its kernel exists for every parameter's device and dtype, else `foreach`."""
    fusable = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16) for p in params
    )
    return {"fused": True} if fusable else {"foreach": True}


def make_optimizer(named: list[tuple[str, nn.Parameter]], config: TrainConfig, train_rows: int):
    """AdamW (no weight decay on biases and LayerNorm weights, as GPT-2 and BERT were trained) and its
    schedule over the run's optimiser steps."""
    trainable = [p for _, p in named]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        # One fused kernel over the many small LoRA tensors (the default on CPU is a Python loop; measured
        # on 144 LoRA tensors, AMX CPU: 4.9 ms per step, foreach 3.7 ms, fused 1.0 ms).
        **fused_or_foreach(trainable),
    )
    steps_per_epoch = math.ceil(math.ceil(train_rows / config.batch_size) / config.grad_accum)
    scheduler = make_scheduler(optimizer, config.scheduler, steps_per_epoch * config.epochs, config.warmup)
    return optimizer, scheduler


def batch_inputs(
    train: Split, rows: list[int], config: TrainConfig, pad_id: int, pad_to, device, precision: str
) -> tuple:
    """A batch's model inputs: packed rows `(ids, None, positions, segments)` or padded `(ids, mask)`."""
    if packs_batches(config):
        texts = [train.rows[i] for i in rows]
        multiple = train_width_multiple(config, precision)
        width = packed_width([len(t) for t in texts], multiple) if multiple else None
        input_ids, positions, segments = collate_packed(texts, pad_id, width=width)
        return input_ids.to(device), None, positions.to(device), segments.to(device)
    input_ids, attention_mask = collate([train.rows[i] for i in rows], pad_id, pad_to)
    return input_ids.to(device), attention_mask.to(device)


def batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, config: TrainConfig, scale: float | None
) -> float:
    """Backpropagate this rank's share of a batch's loss; returns its summed loss.

    The loss is the batch mean of cross-entropy, times weight[label] with `--class-weights`. In one process
    (`scale` None) it is backpropagated over `grad_accum`; under torchrun a rank's summed loss x `scale`
    (world / global batch size / grad_accum, see distributed.py) makes DDP's gradient average exactly the
    gradient of the global batch's mean."""
    if scale is None and config.class_weights is None:
        loss = F.cross_entropy(logits.float(), targets)
        (loss / config.grad_accum).backward()
        return loss.item() * len(targets)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    if config.class_weights is not None:
        losses = losses * torch.tensor(config.class_weights, device=losses.device)[targets]
    summed = losses.sum()
    (summed * (scale if scale is not None else 1 / (len(targets) * config.grad_accum))).backward()
    return summed.item()


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
    """Train the trainable parameters of `model` on `train`, validating after each epoch; returns one dict
    per epoch.

    Prints the lab's lines (`Epoch 1 | Batch 10 | Loss: 1.2277` every `log_every` batches, then the epoch
    summary and the validation result) with `print_fn` (default: `tqdm.write`) and hands each record to
    `on_record`. With `keep_best`, the weights of the epoch with the lowest validation loss are restored.
    `checkpoint(state)` is called at each epoch end and, with `checkpoint_every` > 0, at the first optimiser
    step after every `checkpoint_every` batches; that state passed back as `resume` continues exactly there."""
    print_fn = _printer(print_fn)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(named, config, len(train.rows))
    ema = ExponentialAverage([p for _, p in named], config.ema) if config.ema else None
    state = TrainState(named, optimizer, scheduler, ema)
    if resume is not None:
        state.load_state_dict(resume)
    forward = distributed.data_parallel(model, device)
    while state.epoch <= config.epochs and not patience_ran_out(state.history, config.patience):
        model.train()
        batches = training_batches(train, config, state.epoch)
        start, since_checkpoint = time.perf_counter() - state.elapsed, 0
        bar = _progress(len(batches), state, config)
        for index, batch in enumerate(batches[state.batch :], start=state.batch + 1):
            rows, weight = distributed.my_rows(batch)
            targets = torch.as_tensor([train.labels[i] for i in rows], dtype=torch.long, device=device)
            with autocast(device, precision):
                logits = forward(*batch_inputs(train, rows, config, pad_id, pad_to, device, precision))
            scale = distributed.loss_scale(len(batch), config.grad_accum, weight)
            loss_sum = batch_loss(logits, targets, config, scale) * weight
            stepped = index % config.grad_accum == 0 or index == len(batches)
            if stepped:
                _optimizer_step(state, config)
            state.loss_sum += loss_sum
            state.correct += int((logits.argmax(-1) == targets).sum()) * int(weight)
            state.seen += len(rows) * int(weight)
            bar.update(1)
            bar.set_postfix(  # drawn with the bar's next redraw (at most every `mininterval`), not now
                loss=f"{loss_sum / len(rows):.4f}",
                acc=f"{state.correct / max(state.seen, 1):.2%}",
                refresh=False,
            )
            if index % config.log_every == 0:
                batch_mean = distributed.global_sum(loss_sum, device) / len(batch)  # the global batch's
                print_fn(f"Epoch {state.epoch} | Batch {index} | Loss: {batch_mean:.4f}")
                on_record({"type": "batch", "epoch": state.epoch, "batch": index, "loss": batch_mean})
            since_checkpoint += 1
            if checkpoint and checkpoint_every and stepped and since_checkpoint >= checkpoint_every:
                if index < len(batches):  # the epoch end checkpoints anyway, after validation
                    state.batch, state.elapsed = index, time.perf_counter() - start
                    checkpoint(_global_snapshot(state, device))
                since_checkpoint = 0
        bar.close()
        _end_epoch(model, state, val, label_names, config, len(batches), time.perf_counter() - start,
                   print_fn=print_fn, on_record=on_record, pad_id=pad_id, device=device, precision=precision)  # fmt: skip
        if checkpoint:
            checkpoint(state.state_dict())
    _keep_best(state, config, print_fn)
    return state.history


def _printer(print_fn):
    if not distributed.is_main():
        return lambda line: None  # only rank 0 prints
    return print_fn or tqdm.write  # above the progress bar, not through it


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar. Where stderr is a file or a pipe (`lorafit train > log 2>&1`, not a terminal or a
    notebook) it redraws every 30 s instead of ten times a second, so the log stays readable. tqdm's
    own variables rule where set (`TQDM_MININTERVAL=1`, `TQDM_DISABLE=1`)."""
    notebook = any(c.__name__ == "tqdm_notebook" for c in tqdm.__mro__)
    if not notebook and not sys.stderr.isatty() and "TQDM_MININTERVAL" not in os.environ:
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(**kwargs)


def _progress(total: int, state: TrainState, config: TrainConfig):
    return progress_bar(total=total, initial=state.batch, desc=f"Epoch {state.epoch}/{config.epochs}",
                        unit="batch", leave=False, disable=not distributed.is_main())  # fmt: skip


def _optimizer_step(state: TrainState, config: TrainConfig) -> None:
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in state.named], config.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema:
        state.ema.update()


def _global_snapshot(state: TrainState, device: torch.device) -> dict:
    """A mid-epoch checkpoint's state: under torchrun rank 0 (which writes it) takes over the running sums
    of all ranks, and the other ranks count on from zero."""
    sums = distributed.sum_to_main((state.loss_sum, state.correct, state.seen), device)
    state.loss_sum, state.correct, state.seen = sums[0], int(sums[1]), int(sums[2])
    return state.state_dict()


def _end_epoch(model, state: TrainState, val: Split, label_names, config: TrainConfig, n_batches: int,
               seconds: float, *, print_fn, on_record, pad_id: int, device, precision: str) -> None:  # fmt: skip
    """The epoch's summary line, validation (of the moving average, with `--ema`), its record, the best
    epoch so far; then the next epoch's empty sums."""
    loss_sum, correct, seen = distributed.all_reduce_sum((state.loss_sum, state.correct, state.seen), device)
    train_loss, train_accuracy = loss_sum / seen, correct / seen
    print_fn(
        f"Epoch {state.epoch} Finished | Avg Loss: {train_loss:.4f} | Acc: {train_accuracy:.2%} | Time: {seconds:.2f}s"
    )
    if state.ema:
        state.ema.swap()  # validate (and keep) the average
    result = evaluate(model, val.rows, val.labels, label_names, pad_id=pad_id, batch_size=config.eval_batch_size,
                      device=device, precision=precision)  # fmt: skip
    print_fn(f"Validation | Loss: {result['loss']:.4f} | Acc: {result['accuracy']:.2%}")
    record = {"epoch": state.epoch, "seconds": seconds, "batches": n_batches, "train_loss": train_loss,
              "train_accuracy": train_accuracy, "val_loss": result["loss"], "val_accuracy": result["accuracy"],
              "lr": state.scheduler.get_last_lr()[0]}  # fmt: skip
    state.history.append(record)
    on_record({"type": "epoch", **record})
    if config.keep_best and result["loss"] < state.best_loss:
        state.best_loss = result["loss"]
        state.best_state = {name: p.detach().clone() for name, p in state.named}
    last = state.epoch >= config.epochs or patience_ran_out(state.history, config.patience)
    if last and state.epoch < config.epochs:
        best = kept_epoch(state.history, keep_best=True)
        print_fn(f"Stopping early: the validation loss has not fallen below epoch {best}'s for "
                 f"{config.patience} epoch{'s' if config.patience > 1 else ''} (--patience)")  # fmt: skip
    if state.ema and not last:
        state.ema.swap()  # back to the raw weights to train on; after the last epoch the average stays
    state.start_epoch(state.epoch + 1)


def patience_ran_out(history: list[dict], patience: int) -> bool:
    """Early stopping: whether `patience` (> 0) epochs have passed since the lowest validation loss. The
    history alone decides, so a resumed run stops where the uninterrupted one would have."""
    if patience <= 0 or not history:
        return False
    return history[-1]["epoch"] - kept_epoch(history, keep_best=True) >= patience


def kept_epoch(history: list[dict], keep_best: bool) -> int:
    """The epoch whose weights a run ends with: the lowest validation loss with `keep_best`, else the last."""
    return (min(history, key=lambda r: r["val_loss"]) if keep_best else history[-1])["epoch"]


def _keep_best(state: TrainState, config: TrainConfig, print_fn) -> None:
    if config.keep_best and state.best_state is not None and len(state.history) > 1:
        best = kept_epoch(state.history, keep_best=True)
        with torch.no_grad():
            for name, p in state.named:
                p.copy_(state.best_state[name])
        print_fn(f"Keeping epoch {best} (lowest validation loss {state.best_loss:.4f})")
        if best == state.history[-1]["epoch"]:
            # Validation loss still falling at the end: on SMS's 1,045 training rows MPNet made 17 held-out
            # errors with 5 epochs against 30 with 3 (docs/models.md); runs that peak earlier gained nothing.
            print_fn(
                "The last epoch validated best, so the model may still be learning: more --epochs may help"
            )

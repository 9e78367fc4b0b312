"""Speed benchmark: lorafit vs the reference lab loop (LLMs-from-scratch) vs Hugging Face + PEFT, on CPU.

All systems fine-tune a randomly initialised GPT-2 124M (timing does not depend on the weight values) with
LoRA rank 8, alpha 16 on the block linears, batch 8, lr 5e-4, on the same balanced split of the UCI SMS
Spam Collection (seed 123, 70/10/20 -> 1,045 / 149 / 300 rows, GPT-2 BPE). Rows:

  reference           LLMs-from-scratch: ch04 `GPTModel`, out_head -> Linear(768, 2), base frozen, then
                      appendix E `replace_linear_with_lora`; ch06 `SpamDataset` (every row padded to the longest
                      training example, ~120 tokens), its training step (`calc_loss_batch`: loss on the last
                      token's logits; AdamW over `model.parameters()`), fp32; inference: `calc_accuracy_loader`
                      over the test set in padded batches of 8 under no_grad.
  lorafit-fp32-padded lorafit's `fit` with `--no-bucketing --precision fp32` behaviour (every batch padded to
                      the same length as the reference), to isolate the levers.
  lorafit             lorafit's defaults: class-mixed length buckets, each batch packed into rows as wide as
                      its longest text (`--packing`), bf16 where `resolve_precision("auto")` picks it (frozen
                      linears stored in bf16, as `lorafit train` does).
  lorafit-sdpa        the defaults with `--attention sdpa`: PyTorch's fused attention kernel instead of the
                      written-out products (the attention lever off).
  lorafit-longest     the defaults with `--packed-width longest`: packed rows as wide as the batch's longest
                      text instead of the fitted width (the width lever off).
  lorafit-fit16       the defaults with `--packed-width fit16`: packed widths multiples of 16 in fp32 too (in
                      fp32 the any-width lever off; in bf16 the same as the defaults).
  lorafit-all-tokens  the defaults with GPT-2's last block run for every token instead of each text's last
                      token alone (`SequenceClassifier.select_last_tokens = False`: the last-token lever off).
  lorafit-no-packing  the same batches with `--no-packing`: each padded to its own longest text (the default
                      before packing).
  lorafit-checkpointing the same with `--activation-checkpointing` (block activations recomputed in the
                      backward pass): the memory / time trade-off.
  hf-peft-padded      transformers `GPT2ForSequenceClassification` + PEFT LoRA on c_attn, c_proj, c_fc
                      (fan_in_fan_out), padded to the reference's length, fp32; inference unmerged, batches of 8.
  hf-peft-dynamic     the same with per-batch padding (random batches padded to their own longest row);
                      inference merged, inference_mode, length-sorted batches of 64.

Lorafit's inference: LoRA merged, `predict_logits` (inference_mode, length-sorted batches of up to 256 texts
and 4,096 tokens, one stream unless the row says otherwise), in bf16 the whole
backbone cast to bf16 as `load_classifier` does.

  lorafit-epoch       lorafit's defaults for ONE MEASURED EPOCH over all 1,045 training rows from a fresh model
                      (no warm-up: every new batch shape pays its setup, as in a real run).
  lorafit-int8-epoch  lorafit-epoch with `--precision int8`: the training step's frozen products in int8
                      (fbgemm; its "% of peak" divides by the fp32 peak); inference in fp32.
  lorafit-bf16, lorafit-fp32  the defaults with the precision forced (`--precision bf16` / `fp32`): what
                      `--precision auto`'s measured choice gains on this CPU.
  hf-peft-bf16        hf-peft-dynamic with its forward passes under bf16 autocast (the peer on the same
                      hardware feature lorafit uses).
  hf-peft-bf16-tcmalloc  the same with tcmalloc preloaded, as lorafit's rows run (a peer given the allocator).
  lorafit-separate-qkv  the defaults with query, key and value one product each (`set_fused_projections(False)`).
  lorafit-tanh-gelu   the defaults with `--gelu tanh` (GPT-2's tanh GELU on bf16 activations too).
  lorafit-system-malloc, lorafit-epoch-system-malloc  lorafit / lorafit-epoch on glibc's malloc
                      (`--malloc system`).

Allocator: the lorafit rows run as the `lorafit` command does (`--malloc auto`: on tcmalloc where it is
installed, `apt install libtcmalloc-minimal4`; the row label then says [tcmalloc]); the reference and HF
rows on glibc's malloc unless their name says tcmalloc.

Measured per system: training seconds per batch over `--batches` batches after 2 warm-up batches, extrapolated
to one epoch (an EXTRAPOLATION, except lorafit-epoch's measured epoch), training messages/s and real
(unpadded) tokens/s, inference messages/s over the 300 test messages, the peak RSS of the process (and in
its progress line and the JSON, `training_peak_rss_mib`: the peak before inference began), and each
as a fraction of the machine's peak: training counts 4·N·T FLOP, inference 2·N·T (N = 85 M block-linear
weights, T real tokens), divided by the 1024² matmul rate (fp32 or bf16, as the row ran) measured at start.
Each system runs in its own subprocess (this script with `--system NAME`), so the peak RSS is per system.

Timings on a shared 2-core VM drift a lot over minutes, so the parent runs the systems round-robin
(reference, lorafit, ..., reference, lorafit, ...) for `--repeats` rounds and reports medians.

The real run (roughly half an hour to an hour on 2 idle cores):

    python benchmarks/speed.py --data ../shared/data/SMSSpamCollection

`--table RESULT.json [--systems a,b]` prints a stored run's table again (its machine line, command and rows,
all of them or those named), without running anything: how the README's Speed tables are made.

A killed run keeps its temporary directory; `--collect /tmp/lorafit-speed-XXXX --repeats N` prints the table
of the system runs that finished there. Ctrl-C in the parent does the same for the runs done so far.

`--smoke` runs the whole pipeline in a minute or so (2-layer, 64-wide GPT-2, 40 training rows, 2 batches,
1 round); its numbers mean nothing. Needs `pip install --no-deps llms-from-scratch==1.0.19` (its declared requirements would pull
tensorflow and an older numpy; what it imports is already here) and transformers + peft; a row whose package is missing is skipped with a note. Prints a Markdown table and writes
benchmarks/results/speed.json (speed-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_SEED = 123
SPLIT = (0.7, 0.1, 0.2)
BATCH_SIZE = 8
LR = 5e-4
WEIGHT_DECAY = 0.1
RANK, ALPHA = 8, 16
WARMUP_BATCHES = 2
# lorafit's inference batch size (`--eval-batch-size`, `predict --batch-size`; at most 4,096 tokens: the 300
# test messages hold 9.3 k tokens). The HF rows keep 64, their own best: padded batches of 256 took HF's
# eager attention to 4 GB and 6 messages/s instead of 14 (results/speed-fp32-epyc-6.json).
INFERENCE_BATCH = 256
HF_INFERENCE_BATCH = 64
PAD_ID = 50256  # <|endoftext|>, GPT-2's padding token in the lab, in lorafit and here for HF

GPT2_124M = dict(vocab_size=50257, context_length=1024, d_model=768, n_layer=12, n_head=12)
GPT2_SMOKE = dict(vocab_size=50257, context_length=1024, d_model=64, n_layer=2, n_head=2)
SMOKE_TRAIN_ROWS = 40


# --------------------------------------------------------------------------------------------------
# Child side: one system, one process.
# --------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timing_result(
    seconds: float, batches: int, messages: int, real_tokens: int, padded_tokens: int
) -> dict[str, float]:
    return {
        "train_seconds": seconds,
        "train_batches": batches,
        "train_messages": messages,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "s_per_batch": seconds / batches,
        "messages_per_s": messages / seconds,
        "tokens_per_s": real_tokens / seconds,
    }


def reference_model(shape: dict) -> Any:
    """ch04's GPTModel of `shape` with ch06's two-class head, frozen, then appendix E's LoRA."""
    import torch
    from llms_from_scratch.appendix_e import replace_linear_with_lora
    from llms_from_scratch.ch04 import GPTModel

    cfg = {
        "vocab_size": shape["vocab_size"],
        "context_length": shape["context_length"],
        "emb_dim": shape["d_model"],
        "n_heads": shape["n_head"],
        "n_layers": shape["n_layer"],
        "drop_rate": 0.0,
        "qkv_bias": True,
    }
    model = GPTModel(cfg)
    model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)  # as ch06 does
    for param in model.parameters():  # as appendix E does: freeze, then add LoRA
        param.requires_grad = False
    replace_linear_with_lora(model, rank=RANK, alpha=ALPHA)
    return model


def run_reference(job: dict) -> dict:
    """The lab: ch04 GPTModel + appendix E LoRA, ch06 SpamDataset and training step, fp32."""
    import torch
    from llms_from_scratch.ch06 import SpamDataset, calc_accuracy_loader, calc_loss_batch
    from torch.utils.data import DataLoader

    from lorafit.tokenizers import gpt2_encoding

    device = torch.device("cpu")
    tokenizer = gpt2_encoding()
    train_dataset = SpamDataset(job["train_csv"], tokenizer=tokenizer, max_length=None, pad_token_id=PAD_ID)
    test_dataset = SpamDataset(
        job["test_csv"], tokenizer=tokenizer, max_length=train_dataset.max_length, pad_token_id=PAD_ID
    )
    if train_dataset.max_length != job["max_length"]:
        print(
            f"warning: SpamDataset pads to {train_dataset.max_length}, lorafit to {job['max_length']}",
            file=sys.stderr,
        )
    torch.manual_seed(DATA_SEED)
    train_loader = DataLoader(
        train_dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0, drop_last=True
    )
    test_loader = DataLoader(
        test_dataset, batch_size=BATCH_SIZE, shuffle=False, num_workers=0, drop_last=False
    )
    needed = WARMUP_BATCHES + job["batches"]
    if len(train_loader) < needed:
        raise SystemExit(f"reference: {len(train_loader)} training batches, need {needed}")

    model = reference_model(job["model"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(input_batch: torch.Tensor, target_batch: torch.Tensor) -> None:
        # The body of ch06's train_classifier_simple, without its periodic evaluation.
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, device)
        loss.backward()
        optimizer.step()

    model.train()
    batches = iter(train_loader)
    for _ in range(WARMUP_BATCHES):
        step(*next(batches))
    real = padded = 0
    start = time.perf_counter()
    for _ in range(job["batches"]):
        input_batch, target_batch = next(batches)
        step(input_batch, target_batch)
        real += int((input_batch != PAD_ID).sum())  # SMS texts never contain <|endoftext|>
        padded += input_batch.numel()
    seconds = time.perf_counter() - start
    result = timing_result(seconds, job["batches"], job["batches"] * BATCH_SIZE, real, padded)
    result["training_peak_rss_mib"] = peak_rss_mib()
    start = time.perf_counter()
    accuracy = calc_accuracy_loader(test_loader, model, device)
    inference_seconds = time.perf_counter() - start
    return {
        **result,
        "precision": "fp32",
        "pad_to": train_dataset.max_length,
        "trainable_parameters": trainable_parameters(model),
        "inference_seconds": inference_seconds,
        "inference_messages": len(test_dataset),
        "inference_real_tokens": sum(len(r) for r in job["test"]["rows"]),
        "inference_accuracy_random_weights": accuracy,
    }


def lorafit_model(job: dict, precision: str, activation_checkpointing: bool, select_last_tokens: bool) -> Any:
    """GPT-2 of the job's shape, random weights, LoRA r8 on every block linear, a two-class head that pools
    the last token; frozen weights as `lorafit train` prepares them (bf16: stored in bf16; int8: int8 products)."""
    import dataclasses

    import torch

    from lorafit.classifier import build_classifier, resolve_model
    from lorafit.config import LoRAConfig
    from lorafit.devices import prepare_frozen_weights

    spec = resolve_model("gpt2", "random")
    spec.config = dataclasses.replace(spec.config, **job["model"])
    model, _ = build_classifier(
        spec, 2, "last", LoRAConfig(rank=RANK, alpha=ALPHA), seed=DATA_SEED, device=torch.device("cpu")
    )
    prepare_frozen_weights(model, precision)
    model.backbone.activation_checkpointing = activation_checkpointing
    model.select_last_tokens = select_last_tokens
    return model


def lorafit_inference_seconds(model: Any, job: dict, precision: str) -> float:
    """Seconds for merged-LoRA `predict_logits` over the test rows (in bf16 the whole backbone cast to
    bf16 first, as `load_classifier` does)."""
    import torch

    from lorafit.devices import cast_for_inference
    from lorafit.lora import merge_lora
    from lorafit.train import predict_logits

    model.eval()
    merge_lora(model)
    if precision == "bf16":
        cast_for_inference(model)
    start = time.perf_counter()
    predict_logits(
        model, job["test"]["rows"], pad_id=PAD_ID, batch_size=INFERENCE_BATCH, device=torch.device("cpu"),
        precision=precision,
    )  # fmt: skip
    return time.perf_counter() - start


def token_cells(part: Any, batches: list, config: Any, pad_to: int | None, precision: str) -> int:
    """Token cells (real + padding) of `part`'s training `batches`: packed rows as `fit` builds them, or
    each batch padded to its longest text (at least `pad_to`)."""
    import torch

    from lorafit.train import batch_inputs, packs_batches

    if packs_batches(config):
        device = torch.device("cpu")
        return sum(
            batch_inputs(part, list(b), config, PAD_ID, None, device, precision)[0].numel() for b in batches
        )
    lengths = [len(r) for r in part.rows]
    return sum(len(batch) * max(pad_to or 0, max(lengths[i] for i in batch)) for batch in batches)


def run_lorafit(
    job: dict,
    bucketing: bool,
    precision: str,
    activation_checkpointing: bool = False,
    packing: bool = True,
    full_epoch: bool = False,
    attention: str = "auto",
    packed_width: str = "fit",
    select_last_tokens: bool = True,
    fused_projections: bool = True,
    gelu: str = "auto",
    streams: str = "1",
) -> dict:
    """lorafit's own `fit` (timed by its epoch clock) on the timed rows, then merged-LoRA `predict_logits`.

    With `full_epoch`, one whole epoch over every training row from a fresh model instead (no warm-up:
    the first batch of each shape pays its setup, as in a real run): a measured epoch, not extrapolated."""
    import torch

    from lorafit.config import TrainConfig, resolve_train_config
    from lorafit.devices import cap_kernel_cache, resolve_precision
    from lorafit.lora import set_fused_projections
    from lorafit.models.attention import set_kernel
    from lorafit.models.gpt2 import set_gelu
    from lorafit.streams import set_streams, stream_count
    from lorafit.train import Split, fit, training_batches

    cap_kernel_cache()  # as `lorafit train` does, before the first product
    set_kernel(attention)
    set_fused_projections(fused_projections)
    set_gelu(gelu)
    set_streams(streams)
    device = torch.device("cpu")
    precision = resolve_precision(precision, device)
    model = lorafit_model(job, precision, activation_checkpointing, select_last_tokens)
    config = resolve_train_config(
        TrainConfig(
            epochs=1, batch_size=BATCH_SIZE, lr=LR, seed=DATA_SEED, bucketing=bucketing, log_every=10**9,
            packing=packing, packed_width=packed_width,
        ),
        "gpt2",
    )  # fmt: skip
    rows, labels = job["train"]["rows"], job["train"]["labels"]

    def split(indices: list[int]) -> Split:
        return Split([rows[i] for i in indices], [labels[i] for i in indices])

    pad_to = None if bucketing else job["max_length"]
    tiny_val = split(job["warm_idx"][:BATCH_SIZE])  # fit validates after its epoch; outside its clock

    def run(part: Split) -> float:
        history = fit(
            model, part, tiny_val, ["ham", "spam"], config, pad_id=PAD_ID, device=device,
            precision=precision, pad_to=pad_to, print_fn=lambda line: None,
        )  # fmt: skip
        return history[0]["seconds"]

    if full_epoch:
        timed = split(list(range(len(rows))))
    else:
        run(split(job["warm_idx"]))
        timed = split(job["timed_idx"])
    seconds = run(timed)
    batches = training_batches(timed, config, epoch=1)
    padded = token_cells(timed, batches, config, pad_to, precision)
    result = timing_result(seconds, len(batches), len(timed.rows), sum(map(len, timed.rows)), padded)
    test_rows = job["test"]["rows"]
    return {
        **result,
        "precision": precision,
        "pad_to": pad_to,
        "trainable_parameters": trainable_parameters(model),
        "training_peak_rss_mib": peak_rss_mib(),  # before inference: which phase sets the peak
        "inference_seconds": lorafit_inference_seconds(model, job, precision),
        "inference_messages": len(test_rows),
        "inference_real_tokens": sum(len(r) for r in test_rows),
        "measured_epoch_seconds": seconds if full_epoch else None,
        "streams": stream_count(device),  # inference's (training runs in one)
    }


def run_hf(job: dict, dynamic: bool, bf16: bool = False) -> dict:
    """transformers GPT2ForSequenceClassification + PEFT LoRA (c_attn, c_proj, c_fc), fp32, or with `bf16`
    its forward passes under bf16 autocast (the hardware feature lorafit uses, for a fair peer)."""
    import torch

    from lorafit.batching import collate, epoch_batches

    torch.manual_seed(DATA_SEED)
    model = hf_peft_model(job["model"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
    rows, labels = job["train"]["rows"], job["train"]["labels"]
    pad_to = None if dynamic else job["max_length"]

    def batches(indices: list[int]) -> list[list[int]]:
        lengths = [len(rows[i]) for i in indices]
        order = epoch_batches(lengths, BATCH_SIZE, seed=DATA_SEED, epoch=1, bucketing=False)
        return [[indices[j] for j in batch] for batch in order]

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step(batch: list[int]) -> tuple[int, int]:
        input_ids, attention_mask = collate([rows[i] for i in batch], PAD_ID, pad_to)
        targets = torch.as_tensor([labels[i] for i in batch], dtype=torch.long)
        with amp():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(attention_mask.sum()), attention_mask.numel()

    model.train()
    for batch in batches(job["warm_idx"]):
        step(batch)
    timed = batches(job["timed_idx"])
    real = padded = 0
    start = time.perf_counter()
    for batch in timed:
        r, p = step(batch)
        real += r
        padded += p
    seconds = time.perf_counter() - start
    result = timing_result(seconds, len(timed), sum(len(b) for b in timed), real, padded)
    test_rows = job["test"]["rows"]
    return {
        **result,
        "precision": "bf16" if bf16 else "fp32",
        "pad_to": pad_to,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "training_peak_rss_mib": peak_rss_mib(),
        "inference_seconds": hf_inference_seconds(model, job, dynamic, amp),
        "inference_messages": len(test_rows),
        "inference_real_tokens": sum(len(r) for r in test_rows),
    }


def hf_peft_model(shape: dict) -> Any:
    """transformers' GPT2ForSequenceClassification of `shape` (dropout off), random weights, with PEFT's
    LoRA on c_attn, c_proj and c_fc."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=shape["context_length"],
        n_embd=shape["d_model"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=0.0,  # dropout off, as in the lab and in lorafit's defaults
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD_ID,
        num_labels=2,
    )
    model = GPT2ForSequenceClassification(config)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
    )
    return get_peft_model(model, lora)


def hf_inference_seconds(model: Any, job: dict, dynamic: bool, amp: Callable) -> float:
    """Seconds to classify the test rows: with `dynamic` as lorafit does (merged, inference_mode,
    length-sorted batches of HF_INFERENCE_BATCH), else as the lab does (unmerged, no_grad, padded batches
    of 8 in order)."""
    import torch

    from lorafit.batching import collate, sorted_batches

    test_rows = job["test"]["rows"]
    start = time.perf_counter()
    if dynamic:
        merged = model.merge_and_unload()
        merged.eval()
        with torch.inference_mode(), amp():
            for batch in sorted_batches([len(r) for r in test_rows], HF_INFERENCE_BATCH):
                input_ids, attention_mask = collate([test_rows[i] for i in batch], PAD_ID)
                merged(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    else:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(test_rows), BATCH_SIZE):
                chunk = test_rows[i : i + BATCH_SIZE]  # already cut to max_length, as SpamDataset does
                input_ids, attention_mask = collate(chunk, PAD_ID, job["max_length"])
                model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    return time.perf_counter() - start


SYSTEMS: dict[str, dict[str, Any]] = {
    "reference": {
        "needs": ["llms_from_scratch"],
        "run": run_reference,
        "label": "reference (LLMs-from-scratch, padded to {L}, fp32)",
    },
    "lorafit-fp32-padded": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=False, precision="fp32"),
        "label": "lorafit, padded to {L}, fp32 (--no-bucketing --precision fp32)",
    },
    "lorafit": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto"),
        "label": "lorafit defaults (class-mixed buckets, packed, {precision})",
    },
    "lorafit-epoch": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", full_epoch=True),
        "label": "lorafit defaults, one MEASURED epoch of every training row ({precision})",
    },
    "lorafit-int8-epoch": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="int8", full_epoch=True),
        "label": "lorafit --precision int8 (frozen products in int8), one MEASURED epoch",
    },
    "lorafit-two-streams": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", streams="2"),
        "label": "lorafit --streams 2 ({precision})",
    },
    "lorafit-bf16": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="bf16"),
        "label": "lorafit defaults forced to bf16 (--precision bf16)",
    },
    "lorafit-fp32": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="fp32"),
        "label": "lorafit defaults forced to fp32 (--precision fp32)",
    },
    "lorafit-sdpa": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", attention="sdpa"),
        "label": "lorafit --attention sdpa (PyTorch's fused kernel, {precision})",
    },
    "lorafit-longest": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", packed_width="longest"),
        "label": "lorafit --packed-width longest ({precision})",
    },
    "lorafit-fit16": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", packed_width="fit16"),
        "label": "lorafit --packed-width fit16 ({precision})",
    },
    "lorafit-all-tokens": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", select_last_tokens=False),
        "label": "lorafit, GPT-2's last block for every token ({precision})",
    },
    "lorafit-no-packing": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", packing=False),
        "label": "lorafit --no-packing (class-mixed buckets, padded, {precision})",
    },
    "lorafit-checkpointing": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", activation_checkpointing=True),
        "label": "lorafit defaults + --activation-checkpointing ({precision})",
    },
    "lorafit-separate-qkv": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", fused_projections=False),
        "label": "lorafit, query / key / value one product each ({precision})",
    },
    "lorafit-tanh-gelu": {
        "needs": [],
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", gelu="tanh"),
        "label": "lorafit --gelu tanh ({precision})",
    },
    "lorafit-system-malloc": {
        "needs": [],
        "malloc": "system",
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto"),
        "label": "lorafit --malloc system ({precision})",
    },
    "lorafit-epoch-system-malloc": {
        "needs": [],
        "malloc": "system",
        "run": lambda job: run_lorafit(job, bucketing=True, precision="auto", full_epoch=True),
        "label": "lorafit --malloc system, one MEASURED epoch ({precision})",
    },
    "hf-peft-padded": {
        "needs": ["transformers", "peft"],
        "run": lambda job: run_hf(job, dynamic=False),
        "label": "HF transformers + PEFT, padded to {L}, fp32",
    },
    "hf-peft-dynamic": {
        "needs": ["transformers", "peft"],
        "run": lambda job: run_hf(job, dynamic=True),
        "label": "HF transformers + PEFT, per-batch padding, fp32",
    },
    "hf-peft-bf16": {
        "needs": ["transformers", "peft"],
        "run": lambda job: run_hf(job, dynamic=True, bf16=True),
        "label": "HF transformers + PEFT, per-batch padding, bf16 autocast",
    },
    "hf-peft-bf16-tcmalloc": {
        "needs": ["transformers", "peft"],
        "malloc": "tcmalloc",
        "run": lambda job: run_hf(job, dynamic=True, bf16=True),
        "label": "HF transformers + PEFT, per-batch padding, bf16 autocast, preloaded tcmalloc",
    },
}


def malloc_of(system: str) -> str:
    """The allocator a system's process runs on: lorafit's rows as the `lorafit` command does (`--malloc
    auto`: tcmalloc where installed), the peers on glibc's unless a row says otherwise."""
    return SYSTEMS[system].get("malloc", "auto" if system.startswith("lorafit") else "system")


def child_environment(malloc: str, environ: dict) -> dict | None:
    """The environment for a system's process: tcmalloc preloaded or not, as `malloc` says (None: a
    `tcmalloc` row where none is installed)."""
    from lorafit.allocator import REEXEC_MARK, find_tcmalloc

    preloads = [p for p in environ.get("LD_PRELOAD", "").split() if "libtcmalloc" not in p]
    env = {k: v for k, v in environ.items() if k not in ("LD_PRELOAD", REEXEC_MARK)}
    library = find_tcmalloc() if malloc != "system" else None
    if malloc == "tcmalloc" and library is None:
        return None
    preloads = [library, *preloads] if library else preloads
    return {**env, "LD_PRELOAD": " ".join(preloads)} if preloads else env


def child_main(system: str, job_path: str, result_path: str) -> None:
    """Run one system (in this process) and write its measurements as JSON."""
    import torch

    from lorafit.allocator import active_allocator

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    runner: Callable[[dict], dict] = SYSTEMS[system]["run"]
    result = runner(job)
    result["peak_rss_mib"] = peak_rss_mib()
    result["malloc"] = active_allocator()
    result["threads"] = torch.get_num_threads()
    result["inference_messages_per_s"] = result["inference_messages"] / result["inference_seconds"]
    Path(result_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent side: data, alternation, table.
# --------------------------------------------------------------------------------------------------


def prepare_data(path: str, smoke: bool) -> dict:
    """The balanced seed-123 70/10/20 split, GPT-2 BPE token ids, and the lab's padding length."""
    from lorafit.data import balance_classes, label_names, read_table, split_indices
    from lorafit.tokenizers import GPT2Tokenizer

    dataset = read_table(path)
    names = label_names(dataset.labels)
    if names != ["ham", "spam"]:
        raise SystemExit(f"speed.py: {path}: expected the labels ham and spam, got {names}")
    indices = balance_classes(dataset.labels, DATA_SEED)
    train_idx, val_idx, test_idx = split_indices(indices, SPLIT, DATA_SEED)
    sizes = (len(train_idx), len(val_idx), len(test_idx))
    if smoke:
        train_idx = train_idx[:SMOKE_TRAIN_ROWS]
    tokenizer = GPT2Tokenizer()
    train_texts = [dataset.texts[i] for i in train_idx]
    test_texts = [dataset.texts[i] for i in test_idx]
    train_rows, _ = tokenizer.encode_batch(train_texts)
    max_length = min(GPT2_124M["context_length"], max(len(r) for r in train_rows))
    test_rows, truncated = tokenizer.encode_batch(test_texts, max_length)
    return {
        "split_sizes": sizes,
        "max_length": max_length,
        "test_truncated": truncated,
        "train": {"rows": train_rows, "labels": [names.index(dataset.labels[i]) for i in train_idx]},
        "test": {"rows": test_rows, "labels": [names.index(dataset.labels[i]) for i in test_idx]},
        "train_texts": train_texts,
        "test_texts": test_texts,
    }


def write_lab_csv(path: Path, texts: list[str], labels: list[int]) -> None:
    """The CSV layout the lab's SpamDataset reads (columns Text, Label; ham 0, spam 1)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Text", "Label"])
        writer.writerows(zip(texts, labels))


def run_child(system: str, job_path: Path, result_path: Path, threads: int) -> dict | None:
    env = child_environment(malloc_of(system), dict(os.environ))
    if env is None:
        print(f"  {system}: skipped, no tcmalloc installed (apt install libtcmalloc-minimal4)", flush=True)
        return None
    env.update(TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--system", system, "--job", str(job_path)]
    command += ["--result", str(result_path)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not result_path.is_file():
        tail = "\n    ".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        print(f"  {system}: FAILED (exit {done.returncode}):\n    {tail}", flush=True)
        return None
    for line in done.stderr.splitlines():
        if line.startswith("warning:"):
            print(f"  {system}: {line}", flush=True)
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    print(
        f"  {system}: {result['s_per_batch']:.3f} s/batch, {result['messages_per_s']:.2f} msg/s, "
        f"inference {result['inference_messages_per_s']:.1f} msg/s, peak RSS {result['peak_rss_mib']:,.0f} MiB "
        f"({result['training_peak_rss_mib']:,.0f} before inference; {result['wall_seconds']:.0f} s in all)",
        flush=True,
    )
    return result


MEDIAN_KEYS = (
    "inference_real_tokens",
    "s_per_batch",
    "messages_per_s",
    "tokens_per_s",
    "inference_messages_per_s",
    "peak_rss_mib",
    "padded_tokens",
    "real_tokens",
)


def peak_of(peak: dict[str, float], precision: str) -> float:
    """The 1024² matmul rate a row in `precision` is measured against: int8 rows against fp32's (the
    precision they replace; their inference runs in fp32)."""
    return peak["bf16" if precision == "bf16" else "fp32"]


def matmul_peak(
    threads: int, budget_s: float = 2.0, dtypes: tuple[str, ...] = ("fp32", "bf16")
) -> dict[str, float]:
    """GFLOP/s of a 1024 x 1024 matrix product in each of `dtypes` (fp32 and bf16) with `threads` threads,
    the best of up to five bursts: the machine's practical peak that the table's fractions divide by.

    A burst is up to 10 products and about 0.2 s; the bursts of one dtype stop after `budget_s`. Where the CPU
    has no bf16 instructions one bf16 product takes seconds (2.4 s at 0.9 GFLOP/s on an fp32-only EPYC), and
    a fixed 53 products cost two minutes for a figure that only says "no bf16 here".
    """
    import torch

    torch.set_num_threads(threads)
    peak = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm-up: the first product pays for allocation and kernel choice
        bursts = []  # the best burst: a VM's neighbours slow some of them (seen: 140-280 GFLOP/s)
        reps, spent = 1, 0.0
        while len(bursts) < 5 and spent < budget_s:
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            seconds = time.perf_counter() - start
            bursts.append(2 * 1024**3 * reps / seconds / 1e9)
            spent += seconds
            reps = max(1, min(10, int(0.2 * reps / seconds)))  # the probe sets the burst length
        peak[name] = max(bursts)
    return peak


def frozen_linear_parameters(shape: dict) -> int:
    """N: the block linears' weights (4 d^2 attention + 8 d^2 MLP per block), the products a token costs."""
    return shape["n_layer"] * 12 * shape["d_model"] ** 2


def summarise(runs: list[dict], epoch_batches: int) -> dict:
    summary = {key: statistics.median(run[key] for run in runs) for key in MEDIAN_KEYS}
    measured = [run["measured_epoch_seconds"] for run in runs if run.get("measured_epoch_seconds")]
    summary["measured_epoch_seconds"] = statistics.median(measured) if measured else None
    summary["s_per_epoch_extrapolated"] = summary["s_per_batch"] * epoch_batches
    summary["padding_fraction"] = 1 - summary["real_tokens"] / summary["padded_tokens"]
    summary["precision"] = runs[0]["precision"]
    summary["inference_messages"] = runs[0]["inference_messages"]
    summary["trainable_parameters"] = runs[0]["trainable_parameters"]
    summary["malloc"] = runs[0].get("malloc", "system")
    summary["streams"] = runs[0].get("streams", 1)
    before = [run["training_peak_rss_mib"] for run in runs if "training_peak_rss_mib" in run]
    summary["training_peak_rss_mib"] = statistics.median(before) if before else None  # not in older runs
    return summary


def markdown_table(summaries: dict[str, dict], labels: dict[str, str], epoch_batches: int, shape: dict,
                   peak: dict[str, float]) -> str:  # fmt: skip
    """The table; training counts 4·N·T FLOP (forward, and backward for the activations only: the frozen
    weights get no gradient), inference 2·N·T, T the real tokens, divided by the peak of the row's precision."""
    reference = summaries.get("reference")
    n = frozen_linear_parameters(shape)
    lines = [
        f"| system | s/epoch ({epoch_batches} batches) | messages/s | real tokens/s | train % of peak | peak RSS "
        "| inference messages/s | inference % of peak | training × reference | inference × reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        if reference:
            train_ratio = f"{s['messages_per_s'] / reference['messages_per_s']:.2f}x"
            infer_ratio = f"{s['inference_messages_per_s'] / reference['inference_messages_per_s']:.2f}x"
        else:
            train_ratio = infer_ratio = "n/a"
        top = peak_of(peak, s["precision"]) * 1e9
        train_peak = 4 * n * s["tokens_per_s"] / top
        infer_peak = (
            2 * n * s["inference_messages_per_s"] * s["inference_real_tokens"] / s["inference_messages"] / top
        )
        epoch = (f"**{s['measured_epoch_seconds']:,.1f} measured**" if s.get("measured_epoch_seconds")
                 else f"{s['s_per_epoch_extrapolated']:,.1f} (extrapolated)")  # fmt: skip
        lines.append(
            f"| {labels[name]} | {epoch} | {s['messages_per_s']:.2f} | {s['tokens_per_s']:,.0f} | {train_peak:.0%} "
            f"| {s['peak_rss_mib']:,.0f} MiB | {s['inference_messages_per_s']:.1f} | {infer_peak:.0%} "
            f"| {train_ratio} | {infer_ratio} |"
        )
    return "\n".join(lines)


def stored_table(path: str, systems: list[str] | None) -> str:
    """A stored run's table (what `parent_main` printed), led by its machine line and command."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    machine, stored = report["machine"], report["systems"]
    peak = machine.get("matmul_peak_gflops")
    if not peak:
        raise SystemExit(f"speed.py: {path}: no matmul peak stored (a run from before speed.py measured it)")
    names = systems or list(stored)
    missing = [name for name in names if name not in stored]
    if missing:
        raise SystemExit(f"speed.py: {path}: no system {missing[0]!r}; it has {', '.join(stored)}")
    summaries = {name: stored[name]["median"] for name in names}
    labels = {name: stored[name]["label"] for name in names}
    verdict = f" ({machine['bf16_verdict']})" if machine.get("bf16_verdict") else ""  # older runs lack it
    header = (
        f"{machine['cpus']} CPUs, torch {machine['torch']}, fast bf16: {'yes' if machine['fast_bf16'] else 'no'}"
        f"{verdict}; 1024^2 matmul peak {peak['fp32']:,.0f} GFLOP/s fp32, "
        f"{peak['bf16']:,.0f} bf16; {report['repeats']} round(s) of {report['timed_batches']} timed batches"
    )
    table = markdown_table(summaries, labels, report["epoch_batches"], report["model"], peak)
    return f"{header}\n$ {report['command']}\n\n{table}"


def describe_setup(args: argparse.Namespace, data: dict, shape: dict) -> dict:
    """Print the data, model and machine lines; returns the machine's facts (its 1024² matmul peak
    measured now)."""
    import torch

    from lorafit.devices import cpu_bf16_verdict

    sizes, n_train = data["split_sizes"], len(data["train"]["rows"])
    print(
        f"Data: {args.data}: balanced split {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} (seed {DATA_SEED})"
        + (f"; smoke: first {n_train} training rows" if args.smoke else "")
        + f"; longest training example {data['max_length']} tokens"
        + (f" ({data['test_truncated']} test texts cut to it)" if data["test_truncated"] else "")
    )
    print(
        f"Model: GPT-2 random init, {shape['n_layer']} layers x {shape['d_model']} wide"
        + (" (SMOKE: numbers are meaningless)" if args.smoke else " (124M)")
        + f"; LoRA r{RANK} alpha {ALPHA}; batch {BATCH_SIZE}; lr {LR:g}"
    )
    peak = matmul_peak(args.threads)
    fast_bf16, bf16_why = cpu_bf16_verdict()
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, fast bf16: {'yes' if fast_bf16 else 'no'} ({bf16_why}); "
        f"1024^2 matmul peak {peak['fp32']:,.0f} GFLOP/s fp32, {peak['bf16']:,.0f} GFLOP/s bf16"
    )
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "fast_bf16": fast_bf16,
        "bf16_verdict": bf16_why,
        "matmul_peak_gflops": peak,
    }


def chosen_systems(spec: str, notes: list[str]) -> list[str]:
    """The systems `--systems` names that can run here; a missing package skips its row with a note."""
    systems = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"speed.py: unknown system {unknown[0]!r}; choose from {', '.join(SYSTEMS)}")
    for name in list(systems):
        missing = [m for m in SYSTEMS[name]["needs"] if importlib.util.find_spec(m) is None]
        if missing:
            note = f"{name}: skipped, {', '.join(missing)} not installed (pip install --no-deps llms-from-scratch==1.0.19; pip install transformers peft)"
            print("Note: " + note)
            notes.append(note)
            systems.remove(name)
    return systems


def run_rounds(
    args: argparse.Namespace, job: dict, data: dict, systems: list[str], notes: list[str]
) -> dict[str, list[dict]]:
    """Each system's runs: `--repeats` round-robin rounds, each system in its own process (or with
    `--collect`, the result files a killed run left behind, running nothing). The reference reads `data`'s
    texts from the lab's CSV files, written here."""
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="lorafit-speed-") as tmp:
        work = Path(tmp)
        write_lab_csv(work / "train.csv", data["train_texts"], data["train"]["labels"])
        write_lab_csv(work / "test.csv", data["test_texts"], data["test"]["labels"])
        job_path = work / "job.json"
        job_path.write_text(
            json.dumps({**job, "train_csv": str(work / "train.csv"), "test_csv": str(work / "test.csv")})
        )
        if args.collect:
            for round_ in range(1, args.repeats + 1):
                for name in systems:
                    path = Path(args.collect) / f"{name}-{round_}.json"
                    if path.is_file():
                        runs[name].append(json.loads(path.read_text()))
            notes.append(
                f"collected {sum(len(r) for r in runs.values())} finished system runs from {args.collect}"
            )
            return runs
        try:
            for round_ in range(1, args.repeats + 1):
                print(f"Round {round_}/{args.repeats}:", flush=True)
                for name in systems:
                    result = run_child(name, job_path, work / f"{name}-{round_}.json", args.threads)
                    if result is not None:
                        runs[name].append(result)
        except KeyboardInterrupt:  # report what finished rather than nothing
            notes.append("interrupted: medians over the runs that finished (see runs in the JSON)")
    return runs


def row_labels(summaries: dict[str, dict], max_length: int) -> dict[str, str]:
    """Each row's label: its system's, with its precision, allocator and inference streams."""
    return {
        name: SYSTEMS[name]["label"].format(L=max_length, precision=s["precision"])
        + (" [tcmalloc]" if s["malloc"] == "tcmalloc" and "tcmalloc" not in SYSTEMS[name]["label"] else "")
        + (f" [inference in {s['streams']} streams]" if s["streams"] > 1 else "")
        for name, s in summaries.items()
    }


def parent_main(args: argparse.Namespace) -> None:
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    if not Path(args.data).is_file():
        sys.exit(f"speed.py: {args.data}: no such file (pass --data PATH to the UCI SMSSpamCollection)")
    if args.smoke:
        args.batches, args.repeats = 2, 1
    if args.batches < 1 or args.repeats < 1 or args.threads < 1:
        sys.exit("speed.py: --batches, --repeats and --threads must be at least 1")
    import numpy as np

    data = prepare_data(args.data, args.smoke)
    n_train = len(data["train"]["rows"])
    epoch_batches = math.ceil(n_train / BATCH_SIZE)
    needed = (WARMUP_BATCHES + args.batches) * BATCH_SIZE
    if needed > n_train - n_train % BATCH_SIZE:
        sys.exit(f"speed.py: --batches {args.batches} needs {needed} training rows, the split has {n_train}")
    shape = GPT2_SMOKE if args.smoke else GPT2_124M
    machine = describe_setup(args, data, shape)
    notes: list[str] = []
    systems = chosen_systems(args.systems, notes)
    order = np.random.default_rng(DATA_SEED).permutation(n_train).tolist()
    job = {
        "model": shape,
        "batches": args.batches,
        "threads": args.threads,
        "max_length": data["max_length"],
        "train": data["train"],
        "test": data["test"],
        "warm_idx": order[: WARMUP_BATCHES * BATCH_SIZE],
        "timed_idx": order[WARMUP_BATCHES * BATCH_SIZE : needed],
    }
    runs = run_rounds(args, job, data, systems, notes)

    summaries = {name: summarise(r, epoch_batches) for name, r in runs.items() if r}
    labels = row_labels(summaries, data["max_length"])
    for name, r in runs.items():
        widths = {run["pad_to"] for run in r} - {None, data["max_length"]}
        if widths:
            notes.append(f"{name}: padded to {sorted(widths)}, not to lorafit's {data['max_length']} tokens")
    if "reference" in systems and "reference" not in summaries:
        notes.append("reference: every run failed, so there are no ratios")
    print()
    print(markdown_table(summaries, labels, epoch_batches, shape, machine["matmul_peak_gflops"]))
    print_footer(args, n_train, epoch_batches, runs, notes)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "smoke": args.smoke,
        "data": {
            "path": args.data,
            "split_sizes": data["split_sizes"],
            "train_rows_used": n_train,
            "max_length": data["max_length"],
        },
        "model": shape,
        "lora": {"rank": RANK, "alpha": ALPHA},
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "timed_batches": args.batches,
        "warmup_batches": WARMUP_BATCHES,
        "repeats": args.repeats,
        "threads": args.threads,
        "epoch_batches": epoch_batches,
        "extrapolated": True,
        "machine": machine,
        "systems": {
            name: {"label": labels[name], "median": summaries[name], "runs": runs[name]} for name in summaries
        },
        "notes": notes,
    }
    write_report(report, args.out, args.smoke)


def print_footer(
    args: argparse.Namespace, n_train: int, epoch_batches: int, runs: dict[str, list], notes: list[str]
) -> None:
    """What the table's figures are, and the run's notes."""
    print()
    print(
        f"s/epoch is EXTRAPOLATED (but for the row that says measured): median seconds per batch over {args.batches} "
        f"timed batches (after {WARMUP_BATCHES} warm-up batches) x {epoch_batches} batches (ceil({n_train}/{BATCH_SIZE}); "
        "the lab's drop_last loader runs one fewer). Medians over "
        f"{max((len(r) for r in runs.values()), default=0)} round(s), systems run round-robin, each in its own process. tokens/s counts real "
        "(unpadded) tokens; inference is over the test messages."
    )
    for note in notes:
        print("Note: " + note)


def write_report(report: dict, out: str, smoke: bool) -> None:
    """Write the run's JSON atomically: to `out` if it names a .json file, else into that directory as
    speed.json (speed-smoke.json for a smoke run)."""
    from lorafit.io import write_json_atomic

    file = Path(out)
    if file.suffix != ".json":
        file = file / ("speed-smoke.json" if smoke else "speed.json")
    write_json_atomic(file, report)  # makes the directory
    print(f"Wrote {file}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection")
    parser.add_argument("--batches", type=int, default=30, help="timed training batches per run (default 30)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="round-robin rounds over the systems (default 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads in each child (default 2)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 2 batches, 1 round: checks the plumbing"
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results",
        help="a .json file, or a directory to write speed.json in (default: benchmarks/results)",
    )
    parser.add_argument(
        "--collect",
        metavar="DIR",
        help="summarise the per-system result files (NAME-ROUND.json) that a killed run left in its "
        "temporary directory /tmp/lorafit-speed-* (rounds 1 to --repeats), instead of running anything",
    )
    parser.add_argument(
        "--table",
        metavar="RESULT.json",
        help="print a stored run's table (all its systems, or those --systems names) instead of running anything",
    )
    parser.add_argument("--system", help=argparse.SUPPRESS)  # child mode: run one system
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        child_main(args.system, args.job, args.result)
    elif args.table:
        chosen = None if args.systems == parser.get_default("systems") else args.systems.split(",")
        print(stored_table(args.table, chosen))
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

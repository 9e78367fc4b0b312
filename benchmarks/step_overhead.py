"""What a GPT-2 124M LoRA training step costs per batch and per token: warm steps of lorafit's training
path on synthetic batches of 8 texts of growing length, and a least-squares line through them,

    step ms ≈ fixed ms + ms per token × tokens in the batch

The fixed part is what a step costs however few tokens it has: reading the frozen weights (forward and
backward) and the per-operation cost of ~9,400 operator calls (Python, dispatch, oneDNN's primitive
lookups, OpenMP's wake-ups). It came out about the same in fp32 as in bf16, which reads half the bytes,
so the calls dominate it. It grows with the number of steps rather than the number of tokens, so it says
how much a step could gain from fusing operations (a compiler) as opposed to from faster products.

    python benchmarks/step_overhead.py [--precision auto] [--threads 2] [--lengths 2,8,16,30,60]

`--without-adapters` bypasses every LoRA adapter (merged while their `B` is still zero, so the model
computes the same) and trains block 0's first LayerNorm instead, so the backward pass still runs through
all the blocks: the step without LoRA's products, the floor that no LoRA implementation can go below.

`--smoke` runs a 2-layer, 64-wide GPT-2 for two lengths and two steps: it checks the plumbing only.

Runs on whichever allocator the process has: for lorafit's default, preload tcmalloc
(`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4`); the header says which it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def warm_step_ms(model, optimizer, config, precision: str, texts: list[list[int]], steps: int) -> tuple:
    """(packed batch shape, ms per warm training step) for one batch of `texts`, after 5 untimed steps."""
    import torch

    from lorafit.devices import autocast
    from lorafit.train import Split, batch_inputs, batch_loss

    train = Split(texts, [i % 2 for i in range(len(texts))])
    device = torch.device("cpu")
    inputs = batch_inputs(train, list(range(len(texts))), config, 50256, None, device, precision)
    targets = torch.as_tensor(train.labels)

    def step() -> None:
        with autocast(device, precision):
            logits = model(*inputs)
        batch_loss(logits, targets, config, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return tuple(inputs[0].shape), (time.perf_counter() - start) / steps * 1e3


def gpt2_lora(smoke: bool):
    """(spec, model): GPT-2 124M with random weights (`smoke`: 2 layers x 64) and LoRA r8 on all six
    projections, a 2-class head, on the CPU."""
    import speed
    import torch

    from lorafit.classifier import build_classifier, resolve_model
    from lorafit.config import GPT2Config, LoRAConfig

    spec = resolve_model("gpt2", "random")
    if smoke:
        spec = dataclasses.replace(spec, config=GPT2Config(**speed.GPT2_SMOKE))
    model, _ = build_classifier(
        spec, 2, "last", LoRAConfig(rank=8, alpha=16), seed=123, device=torch.device("cpu")
    )
    return spec, model


def lab_training(model):
    """(config, optimizer): the lab's training settings (batch 8, lr 5e-4) and an AdamW over `model`'s
    trainable parameters; `model` in training mode."""
    from lorafit.config import TrainConfig, resolve_train_config
    from lorafit.train import make_optimizer

    config = resolve_train_config(TrainConfig(epochs=1, batch_size=8, lr=5e-4, seed=123), "gpt2")
    optimizer, _ = make_optimizer(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], config, 10_000
    )
    model.train()
    return config, optimizer


def bypass_adapters(model) -> None:
    """Every LoRA adapter merged (its `B` is still zero: the weights do not change) and frozen, and block
    0's first LayerNorm weight trained instead, so the backward pass still runs through every block."""
    from lorafit.lora import lora_modules, merge_lora

    assert all(not m.B.any() for m in lora_modules(model)), "bypass a fresh model only"
    merge_lora(model)
    for module in lora_modules(model):
        module.requires_grad_(False)
    model.backbone.blocks[0].ln1.weight.requires_grad_(True)


def main() -> None:
    import numpy as np
    import speed
    import torch

    from lorafit.allocator import active_allocator
    from lorafit.devices import prepare_frozen_weights, resolve_precision

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="2,8,16,30,60", help="tokens per text (8 texts a batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed warm steps per length")
    parser.add_argument(
        "--without-adapters",
        action="store_true",
        help="LoRA bypassed, block 0's first LayerNorm trained instead: the step's floor without LoRA",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny GPT-2, 2 lengths, 2 steps: plumbing only"
    )
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.steps = "2,8", 2
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    spec, model = gpt2_lora(args.smoke)
    prepare_frozen_weights(model, precision)
    if args.without_adapters:
        bypass_adapters(model)
    config, optimizer = lab_training(model)  # after the bypass: it decides what trains
    adapters = (
        "LoRA bypassed (block 0's ln1 trained, gradients through every block)"
        if args.without_adapters
        else "LoRA r8 on all six projections"
    )
    print(f"GPT-2 {'SMOKE (2 layers x 64; numbers meaningless)' if args.smoke else '124M'}, {adapters}, "
          f"batches of 8 texts, {precision}, {args.threads} threads, {active_allocator()} malloc")  # fmt: skip
    peak = speed.matmul_peak(args.threads)[precision]
    print(f"1024² matmul peak in {precision}: {peak:,.0f} GFLOP/s")
    print("| tokens per text | packed batch | tokens | ms per warm step |")
    print("|---:|---|---:|---:|")
    tokens, times = [], []
    for length in [int(n) for n in args.lengths.split(",")]:
        texts = [[100 + i + j for j in range(length)] for i in range(8)]
        shape, ms = warm_step_ms(model, optimizer, config, precision, texts, args.steps)
        tokens.append(shape[0] * shape[1])
        times.append(ms)
        print(f"| {length} | {shape[0]} × {shape[1]} | {tokens[-1]} | {ms:.1f} |", flush=True)
    per_token, fixed = np.polyfit(tokens, times, 1)
    print(f"\nfit: step ≈ {fixed:.1f} ms + {per_token:.3f} ms per token "
          f"(an SMS lab batch, ~253 tokens: {fixed + per_token * 253:.0f} ms, "
          f"{fixed / (fixed + per_token * 253):.0%} of it fixed)")  # fmt: skip
    model_shape = dataclasses.asdict(spec.config)
    flops = 4 * speed.frozen_linear_parameters(model_shape)  # per token, as speed.py counts
    print(f"per-token part: {flops / 1e6:,.0f} MFLOP of frozen products a token would take "
          f"{flops / peak / 1e6:.3f} ms at that peak, so it runs at {flops / peak / 1e6 / per_token:.0%} of it")  # fmt: skip


if __name__ == "__main__":
    main()

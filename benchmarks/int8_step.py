"""Would int8 frozen products make a GPT-2 124M LoRA step fast enough, and accurate enough, on an fp32-only CPU?

Issue #17's fp32 goal (5x the reference's epoch) needs the step at ~95 % of the fp32 matrix peak, so the one
lever left there is cheaper arithmetic: fbgemm's int8 products (AVX2 `vpmaddubsw`), which run a projection's
shapes 1.6-2.3x faster than fp32 on the fp32-only EPYC. This routes every frozen fp32 `F.linear` through an
autograd function whose forward (`x @ Wᵀ`) and backward (`dy @ W`, for the activations only: the weights are
frozen) are `quantized::linear_dynamic` products over per-channel int8 copies of W and of Wᵀ, and measures

- **numerics**: logits and LoRA gradients against fp32 (bf16 autocast beside them for scale), on pretrained
  MiniLM (real activations, with their outlier features) and random-weight GPT-2, for three variants:
  `tensor` (fbgemm's own per-tensor 7-bit activation quantisation), `row` (each row scaled to the same
  maximum first, so it amounts to per-token quantisation), `row-outliers` (also LLM.int8's split: input
  columns above 6.0 in fp32; this is `--precision int8`, lorafit/int8.py's own code);
- **speed**: warm training steps (`step_overhead.warm_step_ms`, 8 texts of `--length` tokens) in rounds
  that rotate which variant goes first.

    python benchmarks/int8_step.py [--data ../shared/data/SMSSpamCollection] [--rounds 3] [--length 30]

`--smoke` runs a 2-layer, 64-wide GPT-2 and synthetic texts, one round: plumbing only.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit import int8

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch_linear = F.linear
VARIANTS = ("tensor", "row", "row-outliers")
_variant = "row"
_owner = torch.nn.Module()  # holds the int8 copies (lorafit's cache, `int8.int8_copies`)


def int8_product(x: torch.Tensor, packed) -> torch.Tensor:
    """`x @ Wᵀ` with x quantised to 7 bits (fbgemm's AVX2 range) per tensor or, scaled first, per row."""
    if _variant == "tensor":
        return torch.ops.quantized.linear_dynamic(x, packed, True)
    return int8.int8_product(x, packed)


class Int8Linear(torch.autograd.Function):
    """`F.linear(x, W)` for a frozen fp32 W (no bias), both products in int8 (`tensor`, `row`)."""

    @staticmethod
    def forward(ctx, x, weight):
        packed, ctx.packed_t = int8.int8_copies(_owner, weight)
        return int8_product(x, packed)

    @staticmethod
    def backward(ctx, grad):
        return int8_product(grad.contiguous(), ctx.packed_t), None


def int8_linear(x, weight, bias=None):
    if weight.requires_grad or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return torch_linear(x, weight, bias)
    if _variant == "row-outliers" and torch.is_grad_enabled():
        return int8.int8_linear(x, weight, bias, _owner)  # exactly `--precision int8`
    flat = x.reshape(-1, x.shape[-1])
    out = Int8Linear.apply(flat, weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def routed(variant: str):
    """Frozen fp32 products in int8 `variant` inside the block ("fp32" / "bf16": untouched)."""
    global _variant
    _variant = variant
    if variant not in VARIANTS:
        yield
        return
    F.linear = int8_linear  # nn.Linear and lorafit look F.linear up at each call
    try:
        yield
    finally:
        F.linear = torch_linear


def numerics(name: str, texts: list[str] | None, smoke: bool) -> None:
    """Logits and LoRA gradients of one packed batch in each variant, relative to fp32."""
    from step_overhead import gpt2_lora

    from lorafit.batching import collate_packed
    from lorafit.classifier import build_classifier, build_tokenizer, resolve_model
    from lorafit.config import LoRAConfig
    from lorafit.lora import lora_modules

    if name == "gpt2":
        spec, model = gpt2_lora(smoke)
    else:
        spec = resolve_model(name)
        model, _ = build_classifier(spec, 2, "mean", LoRAConfig(rank=8, alpha=16), seed=1)
    generator = torch.Generator().manual_seed(0)
    for m in lora_modules(model):  # a trained-looking B, so that A gets gradients too
        m.B.data = torch.randn(m.B.shape, generator=generator) * 0.02
    if texts is None:
        ids = [[100 + 7 * i + j for j in range(20 + i)] for i in range(16)]
    else:
        ids = build_tokenizer(spec).encode_batch(texts[:16], 128)[0]
    inputs = collate_packed(ids, 0)
    targets = torch.tensor([i % 2 for i in range(len(ids))])
    model.train()
    results = {}
    for variant in ("fp32", "bf16", *VARIANTS):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in every variant
        bf16 = torch.autocast("cpu", torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()
        with routed(variant), bf16:
            logits = model(inputs[0], None, *inputs[1:])
            F.cross_entropy(logits.float(), targets).backward()
        grads = torch.cat([torch.cat([m.A.grad.flatten(), m.B.grad.flatten()]) for m in lora_modules(model)])
        results[variant] = logits.detach().float(), grads
    ref_logits, ref_grads = results.pop("fp32")
    for variant, (logits, grads) in results.items():
        print(f"| {name} | {variant} | {(logits - ref_logits).norm() / ref_logits.norm():.4f} "
              f"| {(grads - ref_grads).norm() / ref_grads.norm():.4f} "
              f"| {F.cosine_similarity(grads, ref_grads, 0):.5f} |", flush=True)  # fmt: skip


def step_times(args) -> None:
    """ms per warm step of each variant, rounds rotating the order."""
    from step_overhead import gpt2_lora, lab_training, warm_step_ms

    _, model = gpt2_lora(args.smoke)
    config, optimizer = lab_training(model)
    texts = [[100 + i + j for j in range(args.length)] for i in range(8)]
    names = ["fp32", *VARIANTS]
    print(f"\n| round | {' | '.join(names)} | best int8 / fp32 |\n|---:|{'---:|' * (len(names) + 1)}")
    for round_ in range(args.rounds):
        ms = {}
        for variant in names[round_ % len(names) :] + names[: round_ % len(names)]:
            with routed(variant):
                ms[variant] = warm_step_ms(model, optimizer, config, "fp32", texts, args.steps)[1]
        best = min(ms[v] for v in VARIANTS)
        print(
            f"| {round_} | {' | '.join(f'{ms[n]:.0f}' for n in names)} | {best / ms['fp32']:.2f} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection", help="label<TAB>text lines")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=30, help="tokens per text, 8 texts a batch")
    parser.add_argument("--steps", type=int, default=10, help="timed warm steps per variant and round")
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer, 64-wide GPT-2, 1 round: plumbing only"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 1, 1
    torch.set_num_threads(2)
    texts = None
    if not args.smoke:
        texts = [line.split("\t", 1)[1].strip() for line in open(args.data, encoding="utf-8")]
    print(f"GPT-2 {'SMOKE (numbers meaningless)' if args.smoke else '124M'}, LoRA r8; int8 = fbgemm "
          f"{'available' if 'fbgemm' in torch.backends.quantized.supported_engines else 'MISSING'}")  # fmt: skip
    print(
        "\n| model | variant | logits rel. error | LoRA grads rel. error | grads cosine |\n|---|---|---:|---:|---:|"
    )
    for name in ["gpt2"] if args.smoke else ["minilm-l6", "gpt2"]:
        numerics(name, texts, args.smoke)
    step_times(args)


if __name__ == "__main__":
    main()

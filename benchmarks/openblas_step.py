"""Would GPT-2 124M's frozen products train faster through numpy's OpenBLAS than through torch's MKL?

On the fp32-only AMD EPYC, gemm_shapes.py's OpenBLAS column runs the model's projection shapes 20-40 %
faster than torch's `F.linear` in isolation. This checks whether a training step gains: warm LoRA steps
(`step_overhead.warm_step_ms`, one batch of 8 texts of `--length` tokens) with every frozen fp32 linear
either left to torch or routed through an autograd function whose forward (`x @ W.T + b`) and backward
(`dy @ W`) products are numpy's, in rounds that alternate which goes first.

    python benchmarks/openblas_step.py [--rounds 4] [--length 30] [--torch-threads-with-openblas 2] [--smoke]

OpenBLAS keeps its own threads beside torch's OpenMP ones, and on 2 cores each pool's waiting threads spin
while the other works: run it under `OMP_WAIT_POLICY=PASSIVE OPENBLAS_THREAD_TIMEOUT=4` as well as without.
`--torch-threads-with-openblas 1` gives torch's own operations a single thread while OpenBLAS runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch_linear = F.linear


class OpenBLASLinear(torch.autograd.Function):
    """`F.linear` for a frozen fp32 weight, both products through numpy (OpenBLAS)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        flat = x.detach().reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(flat.shape[0], weight.shape[0])
        np.matmul(flat.numpy(), weight.detach().numpy().T, out=out.numpy())
        if bias is not None:
            out += bias.detach()
        ctx.save_for_backward(weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = torch.empty(flat.shape[0], weight.shape[1])
        np.matmul(flat.numpy(), weight.detach().numpy(), out=grad_x.numpy())
        return grad_x.view(*grad.shape[:-1], weight.shape[1]), None, None


def openblas_linear(x, weight, bias=None):
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if frozen and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous():
        return OpenBLASLinear.apply(x, weight, bias)
    return torch_linear(x, weight, bias)


def main(argv: list[str] | None = None) -> None:
    from step_overhead import gpt2_lora, lab_training, warm_step_ms

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--length", type=int, default=30, help="tokens per text, 8 texts a batch")
    parser.add_argument("--steps", type=int, default=10, help="timed warm steps per system and round")
    parser.add_argument("--threads", type=int, default=2, help="torch's threads for the plain path")
    parser.add_argument("--torch-threads-with-openblas", type=int, default=2)
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer, 64-wide GPT-2, 1 round: plumbing only"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 1, 1
    _, model = gpt2_lora(args.smoke)
    config, optimizer = lab_training(model)
    texts = [[100 + i + j for j in range(args.length)] for i in range(8)]
    print(f"GPT-2 {'SMOKE (numbers meaningless)' if args.smoke else '124M'}, LoRA r8, fp32, batch 8 x {args.length} "
          "tokens; ms per warm step")  # fmt: skip
    print("| round | torch (MKL) | OpenBLAS | OpenBLAS / torch |\n|---:|---:|---:|---:|")
    systems = {
        "torch": (torch_linear, args.threads),
        "openblas": (openblas_linear, args.torch_threads_with_openblas),
    }
    for round_ in range(args.rounds):
        ms = {}
        for name in sorted(systems, reverse=round_ % 2 == 1):
            F.linear, threads = systems[name]  # nn.Linear and lorafit look F.linear up at each call
            torch.set_num_threads(threads)
            try:
                ms[name] = warm_step_ms(model, optimizer, config, "fp32", texts, args.steps)[1]
            finally:
                F.linear = torch_linear
        print(
            f"| {round_} | {ms['torch']:.0f} | {ms['openblas']:.0f} | {ms['openblas'] / ms['torch']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

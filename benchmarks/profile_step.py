"""Profile lorafit's GPT-2 124M training step and inference batch with torch.profiler (CPU), on packed
batches of the SMS split that speed.py uses, and write the operator table to benchmarks/results/.

    python benchmarks/profile_step.py [--data ../shared/data/SMSSpamCollection] [--precision auto|int8] [--steps 6]

Prints, per phase (forward, backward, optimiser; inference), the operators by self CPU time, and the
step's rate (4·N·T training, 2·N·T inference) against the 1024² matmul peak of the same precision (int8:
fp32's, and its inference runs in fp32 as `--precision int8` does).
Inference is profiled through `predict_logits` with its default batches (merged LoRA, one stream).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/SMSSpamCollection"))
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "int8"])
    parser.add_argument(
        "--steps", type=int, default=6, help="profiled training steps (after 3 warm-up steps)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="auto", choices=["auto", "math", "sdpa"])
    parser.add_argument(
        "--out",
        default=str(ROOT / "benchmarks/results"),
        help="a .txt file, or a directory to write profile-<precision>-<cpu>.txt in (default: benchmarks/results)",
    )
    return parser.parse_args()


def profile_training(model, train, precision: str, steps: int):
    """Profile `steps` training steps of packed batches of 8 (after 3 unprofiled ones): returns the
    profile, the seconds, the real tokens and the token cells (real + padding)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from lorafit.config import TrainConfig, resolve_train_config
    from lorafit.devices import autocast
    from lorafit.train import batch_inputs, batch_loss, make_optimizer, training_batches

    device = torch.device("cpu")
    config = resolve_train_config(TrainConfig(epochs=1, batch_size=8, lr=5e-4, seed=123), "gpt2")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(named, config, len(train.rows))
    batches = training_batches(train, config, epoch=1)

    def step(batch) -> tuple[int, int]:
        inputs = batch_inputs(train, list(batch), config, 50256, None, device, precision)
        targets = torch.as_tensor([train.labels[i] for i in batch])
        with record_function("forward"), autocast(device, precision):
            logits = model(*inputs)
        with record_function("backward"):
            batch_loss(logits, targets, config, None)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sum(len(train.rows[i]) for i in batch), inputs[0].numel()

    model.train()
    for batch in batches[:3]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start, tokens, cells = time.perf_counter(), 0, 0
        for batch in batches[3 : 3 + steps]:
            real, padded = step(batch)
            tokens, cells = tokens + real, cells + padded
        seconds = time.perf_counter() - start
    return prof, seconds, tokens, cells


def profile_inference(model, rows: list[list[int]], precision: str):
    """Profile merged-LoRA `predict_logits` over `rows` with its default batches (what `lorafit eval` and
    `predict` run, in one stream): returns the profile and the seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorafit.config import INFERENCE_BATCH_SIZE
    from lorafit.devices import cast_for_inference
    from lorafit.lora import merge_lora
    from lorafit.train import predict_logits

    model.eval()
    merge_lora(model)
    if precision == "bf16":  # as `load_classifier` does
        cast_for_inference(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        predict_logits(
            model, rows, pad_id=50256, batch_size=INFERENCE_BATCH_SIZE, device=torch.device("cpu"),
            precision=precision, streams=1,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return prof, seconds


def main() -> None:
    import speed
    import torch

    from lorafit.classifier import build_classifier, resolve_model
    from lorafit.config import LoRAConfig
    from lorafit.devices import cpu_bf16_verdict, prepare_frozen_weights, resolve_precision
    from lorafit.io import write_text_atomic
    from lorafit.models.attention import set_kernel
    from lorafit.train import Split

    args = parse_args()
    torch.set_num_threads(args.threads)
    set_kernel(args.attention)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    peak = speed.matmul_peak(args.threads)
    data = speed.prepare_data(args.data, smoke=False)
    spec = resolve_model("gpt2", "random")
    model, _ = build_classifier(spec, 2, "last", LoRAConfig(rank=8, alpha=16), seed=123, device=device)
    prepare_frozen_weights(model, precision)  # int8: the training step's products; inference stays fp32
    top = speed.peak_of(peak, precision)
    train = Split(data["train"]["rows"], data["train"]["labels"])
    train_prof, train_seconds, tokens, cells = profile_training(model, train, precision, args.steps)
    rows = data["test"]["rows"]
    infer_prof, infer_seconds = profile_inference(model, rows, precision)
    n = speed.frozen_linear_parameters(speed.GPT2_124M)
    infer_tokens = sum(len(r) for r in rows)
    lines = [
        f"lorafit GPT-2 124M, LoRA r8, {precision}, {args.threads} threads; {cpu_bf16_verdict()[1]}; "
        f"1024^2 matmul peak {peak['fp32']:,.0f} GFLOP/s fp32, {peak['bf16']:,.0f} bf16",
        f"training: {args.steps} packed batches of 8, {tokens} real tokens ({1 - tokens / cells:.1%} padding) in {train_seconds:.2f} s = "
        f"{train_seconds / args.steps * 1000:.0f} ms/step; 4·N·T at {4 * n * tokens / train_seconds / 1e9:,.0f} GFLOP/s "
        f"({4 * n * tokens / train_seconds / 1e9 / top:.0%} of peak) [profiler overhead included]",
        f"inference: {len(rows)} messages, {infer_tokens} real tokens in {infer_seconds:.2f} s = "
        f"{len(rows) / infer_seconds:.1f} msg/s; 2·N·T at {2 * n * infer_tokens / infer_seconds / 1e9:,.0f} GFLOP/s "
        f"({2 * n * infer_tokens / infer_seconds / 1e9 / top:.0%} of peak)",
        "",
        "TRAINING STEP (self CPU time)",
        train_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
        "TRAINING STEP by phase",
        train_prof.key_averages().table(sort_by="cpu_time_total", row_limit=8),
        "INFERENCE (self CPU time)",
        infer_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20),
    ]
    text = "\n".join(lines)
    print(text)
    path = Path(args.out)  # a .txt file, or a directory for profile-<precision>-<cpu>.txt
    if path.suffix != ".txt":
        path = path / f"profile-{precision}-{cpu_kind()}.txt"
    write_text_atomic(path, text + "\n")  # makes the directory
    print(f"Wrote {path}")


def cpu_kind() -> str:
    """A file-name tag for this CPU: amx, avx512 (AVX-512 BF16) or plain, and the vendor's family."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    units = "amx" if "amx_bf16" in info else "avx512" if "avx512_bf16" in info else "plain"
    family = "epyc" if "AMD" in info else "xeon" if "Intel" in info else "cpu"
    return f"{units}-{family}"


if __name__ == "__main__":
    main()

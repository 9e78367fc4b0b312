"""1 process vs N processes (torchrun, Gloo on CPU) on a small GPT-2: throughput and equivalence.

    python benchmarks/ddp.py [--data ../shared/data/SMSSpamCollection] [--rows 1500] [--nproc 2]

Builds a small random GPT-2 (4 layers, 128 wide) in a temporary directory, trains it one epoch with LoRA
once in one process and once under `torchrun --standalone --nproc_per_node N`, same global batch, and
prints seconds per epoch, messages per second and the largest difference between the two adapters.
On a 2-core CPU, 2 processes are not expected to be faster (they share the cores and add all-reduces);
the point is that the result is the same. On a multi-GPU machine the same command line scales out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafit import GPT2
from lorafit.config import GPT2Config
from lorafit.models.gpt2 import gpt2_state_dict_to_hf


def small_gpt2(directory: Path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(context_length=256, d_model=128, n_layer=4, n_head=4)
    state = {k: v for k, v in GPT2(config).state_dict().items() if k != "lm_head.weight"}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(gpt2_state_dict_to_hf(state, config.n_layer), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(dict(model_type="gpt2", n_positions=256, n_embd=128, n_layer=4, n_head=4))
    )
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/SMSSpamCollection")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1500, help="first N rows of the file (0: all)")
    args = parser.parse_args()
    data = args.data if Path(args.data).is_file() else "sms-spam"

    work = Path(tempfile.mkdtemp(prefix="lorafit-ddp-"))
    if args.rows and data != "sms-spam":  # a 2-core VM runs the full file for many minutes per run
        lines = Path(data).read_text(encoding="utf-8").splitlines(keepends=True)[: args.rows]
        (work / "data.tsv").write_text("".join(lines), encoding="utf-8")
        data = str(work / "data.tsv")
    model = small_gpt2(work / "model")
    common = ["train", "--model", str(model), "--data", data, "--epochs", "1", "--batch-size",
              str(args.batch_size), "--precision", "fp32", "--examples", "0", "--log-every", "1000"]  # fmt: skip
    env = {**os.environ, "LORAFIT_OFFLINE": "1"}
    runs = {
        "1 process": [sys.executable, "-m", "lorafit", *common, "--out", str(work / "one")],
        f"{args.nproc} processes (torchrun)": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "lorafit", *common, "--out", str(work / "many"),
        ],
    }  # fmt: skip
    rows = []
    for name, command in runs.items():
        print(f"running {name}: {' '.join(command)}", file=sys.stderr)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    for name, out in zip(runs, ("one", "many")):
        metrics = json.loads((work / out / "metrics.json").read_text())
        epoch = metrics["epochs"][0]
        rows.append(
            (
                name,
                epoch["seconds"],
                metrics["train"]["count"] / epoch["seconds"],
                metrics["test"]["accuracy"],
            )
        )
    a = load_file(str(work / "one" / "adapter.safetensors"))
    b = load_file(str(work / "many" / "adapter.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)

    print(f"\ndata: {args.data} (first {args.rows or 'all'} rows); model: GPT-2 4 layers × 128, LoRA r8; global batch {args.batch_size}; fp32; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| run | seconds / epoch | training messages / s | test accuracy |")
    print("|---|---|---|---|")
    for name, seconds, rate, accuracy in rows:
        print(f"| {name} | {seconds:.1f} | {rate:.1f} | {accuracy:.2%} |")
    print(f"\nratio (N processes / 1 process, time): {rows[1][1] / rows[0][1]:.2f}")
    print(f"largest |adapter difference|: {diff:.2e}")


if __name__ == "__main__":
    main()

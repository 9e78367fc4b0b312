"""How fast are GPT-2 124M's frozen products at the shapes lorafit runs them, against the 1024² rate?

speed.py and profile_step.py count a row's "% of peak" against a 1024² matmul. This prints, for each of the
model's four projection shapes at a few row counts (246: a packed training batch of 8 SMS; 4,096: an
inference batch at the token cap), the rate of MKL's product (`F.linear`, what lorafit runs), of
oneDNN's (`torch.utils.mkldnn` linear) and, in fp32, of OpenBLAS's (numpy's `x @ W.T`, on its own
threads: `OPENBLAS_NUM_THREADS`; see openblas_step.py for why lorafit does not use it), each as a fraction of a 1024² rate measured just before it, with
the weights warm in cache (best of `--repeats` timings each). The 1024² rate is `speed.matmul_peak`'s, the
one speed.py, profile_step.py and step_overhead.py divide by.

    python benchmarks/gemm_shapes.py [--rows 246,4096] [--precision fp32|bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from speed import GPT2_124M, matmul_peak

# (in, out) of GPT-2 124M's query-key-value, attention output, MLP up and MLP down projections.
D = GPT2_124M["d_model"]
SHAPES = ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))
# Seconds of 1024² bursts before each shape (`speed.matmul_peak`'s budget; its default 2 s is per run).
PEAK_BUDGET_S = 0.5


def best_seconds(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """The best mean time per call over `repeats` timings of `calls` calls, after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def shape_rates(rows: int, fan_in: int, fan_out: int, dtype: torch.dtype, calls: int, repeats: int) -> dict:
    """GFLOP/s of `rows` × fan_in inputs through a fan_in → fan_out linear: MKL, oneDNN, OpenBLAS (fp32)."""
    x = torch.randn(rows, fan_in, dtype=dtype)
    linear = torch.nn.Linear(fan_in, fan_out).to(dtype).eval()
    flop = 2 * rows * fan_in * fan_out
    rates = {
        "mkl": flop / best_seconds(lambda: F.linear(x, linear.weight, linear.bias), calls, repeats) / 1e9
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.utils import mkldnn  # its modules are TorchScript, whose decorators warn on import

        onednn = mkldnn.to_mkldnn(torch.nn.Sequential(linear), dtype)[0]
        rates["onednn"] = flop / best_seconds(lambda: onednn(x), calls, repeats) / 1e9
    except (RuntimeError, AttributeError, TypeError) as e:  # builds without oneDNN, or dtypes it refuses
        print(f"oneDNN linear unavailable at {rows} x {fan_in} x {fan_out}: {e}")
    if dtype == torch.float32:
        x_np, weight_np = x.numpy(), linear.weight.detach().numpy()
        rates["openblas"] = flop / best_seconds(lambda: x_np @ weight_np.T, calls, repeats) / 1e9
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="246,4096", help="row counts, comma-separated (default 246,4096)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=20, help="calls per timing (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per shape, best kept (default 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    print(f"{args.precision}, {args.threads} threads, torch {torch.__version__}; each shape against a 1024² "
          "product timed just before it (a shared VM's speed moves between minutes)")  # fmt: skip
    print(
        "| rows × in × out | 1024² GFLOP/s | MKL GFLOP/s | MKL % of 1024² | oneDNN GFLOP/s | oneDNN % of 1024² "
        "| OpenBLAS GFLOP/s | OpenBLAS % of 1024² |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for fan_in, fan_out in SHAPES:
                peak = matmul_peak(args.threads, PEAK_BUDGET_S, (args.precision,))[args.precision]
                rates = shape_rates(rows, fan_in, fan_out, dtype, args.calls, args.repeats)
                cells = [f"{rates[k]:.0f} | {100 * rates[k] / peak:.0f}%" if k in rates else "– | –"
                         for k in ("mkl", "onednn", "openblas")]  # fmt: skip
                print(f"| {rows} × {fan_in} × {fan_out} | {peak:.0f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()

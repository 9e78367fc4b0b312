"""Where and in what precision lorafit computes: device choice (CUDA, MPS, CPU), bf16 where the hardware
multiplies it measurably faster than fp32, autocast, the frozen weights stored in bf16 for training, and a
whole backbone in bf16 for inference."""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch
from torch import nn

from .errors import LorafitError


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


# `auto` trains in bf16 only where bf16 products run at least this much faster than fp32 ones. 1024^2
# products ran 3.9x (AMX Xeon) and 4.7x (AVX-512 BF16 EPYC) faster in bf16, but 0.6x on a virtualised Xeon
# whose AVX-512 BF16 is exposed without AMX (there the main job trained in 110 s in bf16, 79 s in fp32).
BF16_MIN_SPEEDUP = 1.5


def cpu_bf16_flags() -> bool:
    """Whether this CPU reports bf16 instructions (AVX-512 BF16 or AMX); without them bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_matmul_speedup(rows: int = 256, width: int = 768, repeats: int = 12) -> float:
    """How many times faster a bf16 `rows x width @ width x width` linear runs than the fp32 one here (a
    GPT-2 / BERT-base projection over a few packed texts), best of `repeats` interleaved calls each."""
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    inputs = {
        dtype: (torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype))
        for dtype in best
    }
    with torch.inference_mode():
        for step in range(repeats + 2):  # the first two calls create oneDNN's primitives
            for dtype, (x, w) in inputs.items():
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                if step >= 2:
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


@functools.lru_cache(maxsize=1)
def cpu_bf16_verdict() -> tuple[bool, str]:
    """(whether `auto` should use bf16 on this CPU, why), measured once per process: the flags alone
    mislead where a hypervisor exposes AVX-512 BF16 without the AMX units that make it fast."""
    if not cpu_bf16_flags():
        return False, "this CPU has no fast bf16: no AVX-512 BF16 / AMX"
    speedup = bf16_matmul_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return False, f"bf16 products ran {speedup:.2f}x fp32's speed on this CPU, under {BF16_MIN_SPEEDUP}x"
    return True, f"bf16 products ran {speedup:.1f}x fp32's speed on this CPU"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively and measurably faster than fp32 (see `cpu_bf16_verdict`)."""
    return cpu_bf16_verdict()[0]


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 where bf16 products measure fast on this hardware (`cpu_bf16_verdict`), else fp32.
    `int8` (training only: int8.py) needs a CPU device and a torch build with fbgemm."""
    if precision not in ("auto", "bf16", "fp32", "int8"):
        raise LorafitError(f"--precision must be auto, bf16, fp32 or int8, got {precision!r}")
    if precision == "int8":
        from .int8 import int8_available

        if device.type != "cpu":
            raise LorafitError(f"--precision int8 runs on the CPU only, not on {device}")
        if not int8_available():
            raise LorafitError(
                "--precision int8: this torch build has no fbgemm int8 products (x86 CPUs only)"
            )
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


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in autocast's dtype while autocast is on (else unchanged): cast once where several products
    share an input, since autocast casts it again for each (profiled on an AMX CPU: the casts were 7 % of
    a GPT-2 124M bf16 training step)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


# PyTorch's ideep layer keeps up to LRU_CACHE_CAPACITY (default 1,024) matrix-product primitives, each
# entry holding memory; every new batch shape adds a few. Over GPT-2 124M's 131-step SMS epoch (28 packed
# shapes, bf16, AMX Xeon) the default grew the process by ~200 MiB more than a cap of 64 (peak RSS 1,394
# against 1,192-1,199 MiB, two runs each), at the same speed (16, 64 and 256 alike). `lorafit serve` caps
# oneDNN's own cache too; for training that cap cost 40 % of the time, so it is left alone here.
KERNEL_CACHE_CAPACITY = 64


def cap_kernel_cache() -> None:
    """Cap ideep's primitive cache (LRU_CACHE_CAPACITY) unless the user set it. Read when the first
    product runs, so call it before any: later in a process it changes nothing."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(KERNEL_CACHE_CAPACITY))


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
    from .lora import fuse_shared_input_weights

    fuse_shared_input_weights(model)  # the cast gave every weight its own storage again


def prepare_frozen_weights(model: nn.Module, precision: str) -> None:
    """The frozen weights as a training run in `precision` uses them: bf16 stored in bf16
    (`cast_frozen_weights`); int8 given int8 products (`int8.use_int8_products`); fp32 as they are."""
    if precision == "bf16":
        cast_frozen_weights(model, torch.bfloat16)
    elif precision == "int8":
        from .int8 import use_int8_products

        use_int8_products(model)


def cast_for_inference(model: nn.Module) -> None:
    """Store a classifier's whole backbone in bf16 (LayerNorms, position tables, an unmerged adapter too) so
    that inference runs without autocast: no cast of the activations before every product, a bf16 residual
    stream. The head stays fp32 and pooling sums in fp32. Measured on MiniLM, a batch of 16 SMS messages on
    a 2-core AVX-512 BF16 EPYC: 49.5 ms against 55.9 under autocast, probabilities within 0.0023."""
    from .lora import fuse_shared_input_weights

    model.backbone.to(torch.bfloat16)
    fuse_shared_input_weights(model.backbone)  # the cast gave every weight its own storage again
    model.bf16_inference = True

"""CPU streams for inference: the texts split across threads that each run their kernels on one core.

On a 2-core fp32 CPU, two threads of one intra-op thread each, every one scoring its own share of the
texts in its own batches, can beat one thread that spreads each kernel over both cores: a single-threaded
product wastes no time splitting and joining, and while one stream is between kernels (Python, GELU,
attention's small products) the other keeps its core busy. Measured on a 2-core AMD EPYC without AVX-512
(fp32, benchmarks/README.md, Speed, twenty-ninth session): GPT-2 124M scored the SMS test set 2 % faster in
two streams, random MPNet-shaped models 4-7 %, but a pretrained MiniLM's `predict --file` of 20,000 rows
was no faster and peaked 200-240 MB higher, so one stream is the default (`--streams 2` to choose two).
Training was measured too and did not gain (a step's products are short: 8 texts), so `fit` always runs
in one stream; the server runs its batches on its one inference thread.

The threads share the model's weights (no copies). Results differ from one stream's by rounding only:
each stream packs its own texts into rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from .errors import LorafitError

T = TypeVar("T")
_streams: int = 1
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def set_streams(value: str | int) -> None:
    """Choose the inference streams for this process (`--streams`): a count >= 1 (default 1)."""
    global _streams
    text = str(value)
    if not (text.isdigit() and int(text) >= 1):
        raise LorafitError(f"--streams must be a whole number >= 1, got {value!r}")
    _streams = int(text)


def get_streams() -> int:
    return _streams


def stream_count(device: torch.device) -> int:
    """How many streams inference runs (`--streams`); more than one only on a CPU."""
    if _streams > 1 and device.type != "cpu":
        raise LorafitError(f"--streams {_streams} runs CPU threads; the device here is {device.type}")
    return _streams


def split_evenly(items: Sequence[int], lengths: Sequence[int], n: int) -> list[list[int]]:
    """`items` (with `lengths[k]` the length of `items[k]`) dealt round-robin, longest first, into `n` shares
    of similar work; empty shares (fewer items than `n`) are left out."""
    order = sorted(range(len(items)), key=lambda k: -lengths[k])  # stable: ties keep their order
    shares = [[items[k] for k in order[s::n]] for s in range(n)]
    return [share for share in shares if share]


def run_parallel(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Each job's result, the jobs run at once: the first on this thread, the others on a kept pool of
    threads (kept, so that MKL's and OpenMP's per-thread state is built once), with torch's intra-op
    threads divided among them meanwhile. Grad mode and autocast are per thread: each job sets its own."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    global _pool, _pool_workers
    if _pool_workers < len(jobs) - 1:
        if _pool is not None:
            _pool.shutdown(wait=False)  # idle: its jobs ended with the last call
        _pool_workers = len(jobs) - 1
        _pool = ThreadPoolExecutor(max_workers=_pool_workers, thread_name_prefix="lorafit-stream")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(jobs)))
    try:
        futures = [_pool.submit(job) for job in jobs[1:]]
        try:
            first = jobs[0]()
        finally:
            wait(futures)  # every job ends before the thread count is restored, even if one failed
        return [first, *(f.result() for f in futures)]  # a job's exception is raised here
    finally:
        torch.set_num_threads(threads)

"""Run lorafit's compute commands on tcmalloc where it is installed (`--malloc`, default auto).

A CPU training step allocates and frees a few hundred activation tensors of a few hundred KiB to a few
MiB. glibc's malloc spends about 12 % of the main thread in its bins (`_int_malloc`, `malloc_consolidate`,
profiled with perf on a 2-core AMX Xeon) and hands large blocks back to the kernel, so the next step
faults them in again (about 4,000 page faults per GPT-2 124M step). tcmalloc keeps them: the same 131
steps took 30.6 / 28.4 s instead of 33.9 / 34.7 s, at a peak RSS of 1,217 instead of 1,340 MiB
(benchmarks/README.md, Speed). PyTorch's own CPU tuning guide recommends it the same way, by preloading.

An allocator can only be chosen before the process starts, so `lorafit` re-runs itself once (`execve`:
same process id, arguments and environment, plus `LD_PRELOAD`) when tcmalloc is installed and not yet
loaded. Debian / Ubuntu: `apt install libtcmalloc-minimal4`. Without it, `auto` runs on glibc, unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

from .errors import LorafitError

MALLOC_CHOICES = ("auto", "tcmalloc", "system")
# Set in the re-run process, so that a preload that did not take cannot loop.
REEXEC_MARK = "LORAFIT_MALLOC_REEXEC"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The path of an installed tcmalloc (gperftools' minimal build first), or None."""
    for name in TCMALLOC_NAMES:
        for directory in dirs:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def active_allocator() -> str:
    """`tcmalloc` when this process runs on it (it is mapped in), else `system`."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:
        return "system"


def preload_environment(choice: str, environ: Mapping[str, str], library: str | None) -> dict | None:
    """The environment to re-run this process in so that it runs on tcmalloc (`library`), or None to go on
    as it is: `system`, not Linux, tcmalloc already loaded, already re-run once, or none installed (an
    error for an explicit `tcmalloc`)."""
    if choice not in MALLOC_CHOICES:
        raise LorafitError(f"--malloc must be one of {', '.join(MALLOC_CHOICES)}, got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux") or active_allocator() == "tcmalloc":
        return None
    if environ.get(REEXEC_MARK):
        if choice == "tcmalloc":
            raise LorafitError(f"--malloc tcmalloc: preloading {library} did not load it into this process")
        return None
    if library is None:
        if choice == "tcmalloc":
            raise LorafitError(
                "--malloc tcmalloc: no tcmalloc library found (Debian / Ubuntu: apt install libtcmalloc-minimal4)"
            )
        return None
    preload = " ".join(filter(None, [library, environ.get("LD_PRELOAD", "")]))
    return {**environ, "LD_PRELOAD": preload, REEXEC_MARK: "1"}


def run_on_tcmalloc(choice: str) -> None:
    """Replace this process by the same command on tcmalloc where `preload_environment` says so; else
    return. Call it first thing: nothing done before it survives the `execve`."""
    environ = preload_environment(choice, os.environ, find_tcmalloc())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`, about 2 ms); elsewhere, and
    on tcmalloc, nothing. Batches of ever new shapes leave freed blocks scattered in glibc's heap, which a
    long-lived process would otherwise keep: a server (benchmarks/README.md, "Serving"), or `predict --file`
    packing rows of any width in fp32 (MiniLM, chunks of 4,096 SMS messages: RSS 450 -> 840 MiB over 16
    chunks; 357-360 MiB over 8 with a trim after each; benchmarks/README.md, "Batch prediction to a file")."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

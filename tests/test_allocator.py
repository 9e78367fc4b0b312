"""`--malloc`: lorafit re-runs its compute commands on tcmalloc where it is installed, once, and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorafit.allocator import REEXEC_MARK, active_allocator, find_tcmalloc, preload_environment
from lorafit.errors import LorafitError

LIBRARY = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_the_environment_to_rerun_in(monkeypatch):
    monkeypatch.setattr("lorafit.allocator.active_allocator", lambda: "system")
    env = preload_environment("auto", {"PATH": "/bin"}, LIBRARY)
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIBRARY, REEXEC_MARK: "1"}
    env = preload_environment("tcmalloc", {"LD_PRELOAD": "/opt/other.so"}, LIBRARY)
    assert env["LD_PRELOAD"] == f"{LIBRARY} /opt/other.so"  # another preload is kept
    assert preload_environment("system", {}, LIBRARY) is None
    assert preload_environment("auto", {}, None) is None  # not installed: glibc, silently
    with pytest.raises(LorafitError, match="apt install libtcmalloc-minimal4"):
        preload_environment("tcmalloc", {}, None)
    # Re-run once already: never again (a preload that did not take cannot loop).
    assert preload_environment("auto", {REEXEC_MARK: "1"}, LIBRARY) is None
    with pytest.raises(LorafitError, match="did not load"):
        preload_environment("tcmalloc", {REEXEC_MARK: "1"}, LIBRARY)
    with pytest.raises(LorafitError, match="--malloc must be one of auto, tcmalloc, system"):
        preload_environment("jemalloc", {}, LIBRARY)
    monkeypatch.setattr("lorafit.allocator.active_allocator", lambda: "tcmalloc")
    assert preload_environment("tcmalloc", {}, LIBRARY) is None  # already running on it


def test_find_tcmalloc_looks_in_the_library_directories(tmp_path):
    assert find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")


@pytest.mark.parametrize("choice", ["auto", "system"])
def test_train_runs_on_tcmalloc_where_installed_and_says_so(choice, tiny_gpt2_dir, sms_file, tmp_path):
    """A real `python -m lorafit train`: with auto it re-runs itself on tcmalloc when one is installed (CI
    installs libtcmalloc-minimal4) and the Device line names the allocator the process runs on."""
    result = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file),
         "--epochs", "1", "--precision", "fp32", "--examples", "0", "--out", str(tmp_path / "run"),
         "--malloc", choice],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = "tcmalloc" if choice == "auto" and find_tcmalloc() else "system"
    assert f"| malloc: {expected} |" in result.stdout
    assert active_allocator() in ("system", "tcmalloc")  # this (pytest) process is never re-run


def test_ideeps_kernel_cache_is_capped_unless_set(monkeypatch):
    """Training and loading a run cap PyTorch's ideep primitive cache (peak RSS of GPT-2's SMS epoch 1,394
    -> ~1,195 MiB); a value the user set wins."""
    from lorafit.devices import KERNEL_CACHE_CAPACITY, cap_kernel_cache

    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    cap_kernel_cache()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(KERNEL_CACHE_CAPACITY) == "64"
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "1024")
    cap_kernel_cache()
    assert os.environ["LRU_CACHE_CAPACITY"] == "1024"

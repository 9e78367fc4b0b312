"""Data-parallel training under torchrun (CPU, Gloo): 2 processes give the adapter and metrics of 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def train_args(model_dir, data, out):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--lora-rank", "4", "--lr", "3e-3", "--precision", "fp32", "--examples", "0",
            "--log-every", "3"]  # fmt: skip


def torchrun(*launcher_args, argv, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFIT_DIST_TIMEOUT": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "lorafit", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_what_one_process_trains(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    one = tmp_path / "one"
    main(train_args(tiny_gpt2_dir, sms_file, one))
    capsys.readouterr()
    two = tmp_path / "two"
    process = torchrun("--standalone", "--nproc_per_node", "2", argv=train_args(tiny_gpt2_dir, sms_file, two))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert out.count("Epoch 2 Finished") == 1  # only rank 0 prints

    a, b = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        # Equal up to fp32 summation order (the all-reduce adds two halves), which Adam's normalisation can
        # amplify in an element whose gradient is near zero: nearly all elements agree to 2e-5, none is off
        # by more than 0.2 % of the tensor's scale. A wrong gradient scale would move every element.
        difference = (b[name] - a[name]).abs()
        assert difference.max() <= 2e-3 * a[name].abs().max() + 1e-6, (name, difference.max().item())
        assert (difference > 2e-5).float().mean() <= 0.01, (name, (difference > 2e-5).sum().item())
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for split in ("train", "val", "test"):
        assert m2[split]["count"] == m1[split]["count"]
        assert m2[split]["confusion_matrix"] == m1[split]["confusion_matrix"]
        assert abs(m2[split]["loss"] - m1[split]["loss"]) < 1e-5
    for e1, e2 in zip(m1["epochs"], m2["epochs"]):
        assert (
            abs(e1["train_loss"] - e2["train_loss"]) < 1e-5 and e1["train_accuracy"] == e2["train_accuracy"]
        )


def two_nodes(argv_of_node) -> list[tuple[int, str]]:
    """Two torchrun "nodes" (one process each) on 127.0.0.1; (exit code, stderr) of each."""
    port = str(free_port())
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [torchrun(*launcher, "--node_rank", str(rank), argv=argv_of_node(rank)) for rank in (0, 1)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    return [(node.returncode, err) for node, err in zip(nodes, errors)]


def test_two_nodes_on_one_machine_write_one_run_directory(tiny_gpt2_dir, sms_file, tmp_path):
    results = two_nodes(lambda rank: train_args(tiny_gpt2_dir, sms_file, tmp_path / f"node{rank}"))
    for code, err in results:
        assert code == 0, err[-3000:]
    assert (tmp_path / "node0" / "metrics.json").is_file()
    assert not (tmp_path / "node1").exists()  # rank 0 decides the run directory and alone writes it


def test_ranks_with_different_settings_refuse_to_start(tiny_gpt2_dir, sms_file, tmp_path):
    learning_rates = ("3e-3", "1e-3")
    results = two_nodes(
        lambda rank: train_args(tiny_gpt2_dir, sms_file, tmp_path / "run") + ["--lr", learning_rates[rank]]
    )
    assert all(code != 0 for code, _ in results)
    assert any("rank 1 was started with other settings than rank 0" in err for _, err in results)
    assert not (tmp_path / "run").exists()

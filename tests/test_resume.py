"""Resume: a training process killed mid-epoch (a real subprocess, SIGKILL) continues from its checkpoint
and ends with the same adapter, bit for bit, as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import synthetic_sms, without_wall_time
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.int8 import int8_available


def train_command(model_dir, data, out, *extra):
    return [sys.executable, "-m", "lorafit", "train", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--epochs", "2", "--batch-size", "4", "--lora-rank", "4", "--lr", "3e-3",
            "--precision", "fp32", "--threads", "1", "--log-every", "1", "--checkpoint-every", "3",
            "--examples", "0", *extra]  # fmt: skip


@pytest.fixture
def bigger_sms_file(tmp_path):
    path = tmp_path / "sms160.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in synthetic_sms(160)), encoding="utf-8")
    return path  # 112 training rows: 28 batches of 4 per epoch


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_killed_run_resumes_to_the_same_adapter(tiny_gpt2_dir, bigger_sms_file, tmp_path, precision):
    if precision == "int8" and not int8_available():
        pytest.skip("this torch build has no fbgemm (x86 only)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    done = subprocess.run(
        train_command(tiny_gpt2_dir, bigger_sms_file, reference, "--precision", precision),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        train_command(tiny_gpt2_dir, bigger_sms_file, interrupted, "--precision", precision),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("Epoch 1 | Batch 10 |"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL, "the training process ended before it could be killed"
    assert (interrupted / "checkpoint.pt").is_file()
    assert not (interrupted / "metrics.json").exists()
    state = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) >= (1, 9)  # checkpoints every 3 batches; killed at batch >= 10

    resumed = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--resume", str(interrupted), "--threads", "1"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming {interrupted} at epoch" in resumed.stdout

    a = load_file(str(reference / "adapter.safetensors"))
    b = load_file(str(interrupted / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (interrupted / "checkpoint.pt").exists()  # a finished run keeps no checkpoint

    # The resumed run's records are the uninterrupted run's: each batch logged once, same losses.
    def records(run):
        return without_wall_time([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()])

    assert records(interrupted) == records(reference)
    metrics_a = json.loads((reference / "metrics.json").read_text())
    metrics_b = json.loads((interrupted / "metrics.json").read_text())
    assert metrics_a["test"] == metrics_b["test"]


def test_resume_refuses_finished_runs_and_other_settings(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--epochs", "1", "--out", str(out),
          "--precision", "fp32", "--examples", "0"])  # fmt: skip
    capsys.readouterr()
    for argv, message in (
        (["train", "--resume", str(out)], "this run already finished"),
        (
            ["train", "--resume", str(out), "--lr", "0.1"],
            "--resume takes every setting from the run's config",
        ),
        (["train", "--resume", str(tmp_path / "nothing")], "not a lorafit run directory"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], error


def test_resume_refuses_other_data(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--epochs", "1", "--out", str(out),
          "--precision", "fp32", "--examples", "0"])  # fmt: skip
    # Pretend the run was interrupted after its epoch-end checkpoint, then change the data file.
    (out / "metrics.json").unlink()
    torch.save({"epoch": 2, "batch": 0}, out / "checkpoint.pt")
    sms_file.write_text("ham\tsomething else entirely\nspam\tWIN now\n" * 20, encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume", str(out)])
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "differs from the data this run started on" in error[0], error


def test_runs_from_before_class_mixing_resume_with_length_only_batches(tmp_path):
    from lorafit.run import options_from_run_config

    config = {
        "model": {"name": "minilm-l6", "weights": "pretrained"},
        "pooling": "mean",
        "lora": None,
        "train": {"seed": 3},
        "data": {"source": "sms-spam", "split": [0.7, 0.1, 0.2]},
        "max_length": None,
    }
    assert options_from_run_config(config, tmp_path).train.mix_classes is False
    config["train"]["mix_classes"] = True
    assert options_from_run_config(config, tmp_path).train.mix_classes is True

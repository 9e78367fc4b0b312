"""End to end on a tiny GPT-2 and synthetic data: train → run directory → eval → predict, plus the
invariances the speed levers rely on (padding, bucketing, bf16)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, synthetic_sms, without_wall_time

from lorafit import GPT2, LoRAConfig, load_classifier
from lorafit.batching import collate, epoch_batches
from lorafit.classifier import SequenceClassifier
from lorafit.cli import main
from lorafit.config import TrainConfig
from lorafit.lora import apply_lora
from lorafit.models.gpt2 import gpt2_state_dict_to_hf


def train_tiny(tiny_gpt2_dir, sms_file, out, *extra):
    main(["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--epochs", "2", "--lr", "3e-3",
          "--lora-rank", "4", "--out", str(out), "--log-every", "5", "--precision", "fp32", *extra])  # fmt: skip


def test_train_writes_the_run_directory(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, sms_file, out)
    printed = capsys.readouterr().out
    assert re.search(r"^Epoch 1 \| Batch 5 \| Loss: \d+\.\d{4}$", printed, re.M)
    assert re.search(
        r"^Epoch 2 Finished \| Avg Loss: \d+\.\d{4} \| Acc: \d+\.\d{2}% \| Time: \d+\.\d{2}s$", printed, re.M
    )
    assert re.search(r"^Validation \| Loss: \d+\.\d{4} \| Acc: \d+\.\d{2}%$", printed, re.M)
    for line in (
        "Training accuracy:",
        "Validation accuracy:",
        "Test accuracy:",
        "Parameters before the classification head",
    ):
        assert line in printed
    for name in (
        "config.json",
        "adapter.safetensors",
        "labels.json",
        "metrics.json",
        "log.jsonl",
        "loss.png",
        "accuracy.png",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text()) == ["ham", "spam"]
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert set(metrics[split]) >= {"accuracy", "per_class", "confusion_matrix"}
        assert set(metrics[split]["per_class"]["spam"]) >= {"precision", "recall", "f1"}
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["kept_epoch"] == 2  # GPT-2 keeps its last epoch
    assert set(metrics["epochs"][0]) >= {
        "seconds",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
    }
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"batch", "epoch"}
    # The adapter holds LoRA and the head only: far smaller than the base.
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter.safetensors"))
    assert all(k.endswith((".A", ".B")) or k.startswith("head.") for k in adapter)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The synthetic task is easy: a working loop learns it.
    assert metrics["val"]["accuracy"] >= 0.9


def test_load_classifier_predicts_and_eval_recomputes(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, sms_file, out)
    capsys.readouterr()
    classifier = load_classifier(out, device="cpu")
    rows = [line.split("\t") for line in sms_file.read_text().splitlines()]
    results = classifier.predict([text for _, text in rows])
    agree = sum(r["label"] == label for (label, _), r in zip(rows, results)) / len(rows)
    assert agree >= 0.85
    assert abs(sum(results[0]["probabilities"].values()) - 1) < 1e-5

    main(["eval", "--run", str(out), "--json"])
    recomputed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert recomputed[split]["confusion_matrix"] == saved[split]["confusion_matrix"]

    main(["predict", "--run", str(out), "--json", rows[0][1]])
    line = json.loads(capsys.readouterr().out)
    assert line["label"] == results[0]["label"] and set(line["probabilities"]) == {"ham", "spam"}


def test_no_shuffle_cuts_in_file_order_and_eval_rebuilds_it(tiny_gpt2_dir, tmp_path, capsys):
    rows = sorted(synthetic_sms(), key=lambda row: row[0] == "spam")  # 80 ham, then 40 spam
    data = tmp_path / "ordered.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, data, out, "--no-shuffle", "--epochs", "1")
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["shuffle"] is False
    saved = json.loads((out / "metrics.json").read_text())
    # cut in file order, 84 / 12 / 24: validation and test are the file's last 36 rows, all spam
    assert (saved["train"]["count"], saved["val"]["count"], saved["test"]["count"]) == (84, 12, 24)
    assert [sum(row) for row in saved["test"]["confusion_matrix"]] == [0, 24]
    assert [sum(row) for row in saved["val"]["confusion_matrix"]] == [0, 12]
    capsys.readouterr()
    main(["eval", "--run", str(out), "--json"])
    recomputed = json.loads(capsys.readouterr().out)
    for split in ("train", "val", "test"):
        assert recomputed[split]["confusion_matrix"] == saved[split]["confusion_matrix"]


def test_same_seed_same_adapter(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    from safetensors.torch import load_file

    train_tiny(tiny_gpt2_dir, sms_file, tmp_path / "a", "--epochs", "1")
    train_tiny(tiny_gpt2_dir, sms_file, tmp_path / "b", "--epochs", "1")
    a, b = (
        load_file(str(tmp_path / "a" / "adapter.safetensors")),
        load_file(str(tmp_path / "b" / "adapter.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tiny_classifier(tiny_gpt2_config, pooling="last"):
    torch.manual_seed(0)
    backbone = apply_lora(GPT2(tiny_gpt2_config), LoRAConfig(rank=4))
    model = SequenceClassifier(backbone, 2, pooling).eval()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_more_padding_does_not_change_predictions(tiny_gpt2_config, pooling):
    model = _tiny_classifier(tiny_gpt2_config, pooling)
    rows = [[10, 20, 30], [40, 50, 60, 70, 80, 90], [7]]
    with torch.no_grad():
        tight = model(*collate(rows, 50256))
        padded = model(*collate(rows, 50256, pad_to=40))
    assert (tight - padded).abs().max().item() < 1e-5


def test_bucketed_and_unbucketed_batches_give_the_same_loss(tiny_gpt2_config):
    """The same rows in the same batch, padded to their own longest or to a fixed width: same loss."""
    model = _tiny_classifier(tiny_gpt2_config)
    torch.manual_seed(1)
    rows = [torch.randint(0, 50000, (n,)).tolist() for n in (3, 9, 14, 5, 30, 2, 8, 11)]
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    with torch.no_grad():
        per_batch = torch.nn.functional.cross_entropy(model(*collate(rows, 50256)), labels)
        fixed = torch.nn.functional.cross_entropy(model(*collate(rows, 50256, pad_to=64)), labels)
    assert abs(per_batch.item() - fixed.item()) < 1e-5


def test_bucketing_keeps_every_row_once_and_groups_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = epoch_batches(lengths, 8, seed=42, epoch=1, bucketing=True)
    flat = sorted(int(i) for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = epoch_batches(lengths, 8, seed=42, epoch=1, bucketing=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(plain)
    assert spread < plain_spread / 5
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(lengths, 8, seed=42, epoch=1)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(lengths, 8, seed=42, epoch=2)]


def test_one_batch_windows_give_the_random_batches():
    # window_batches=1 sorts nothing across rows: the batches are the plain shuffle's, in a shuffled order
    # (and each is padded only to its own longest row).
    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    window = epoch_batches(lengths, 8, seed=7, epoch=3, window_batches=1)
    plain = epoch_batches(lengths, 8, seed=7, epoch=3, bucketing=False)
    assert sorted(sorted(b.tolist()) for b in window) == sorted(sorted(b.tolist()) for b in plain)
    assert [sorted(b.tolist()) for b in window] != [sorted(b.tolist()) for b in plain]


def test_class_mixed_bucketing_mixes_classes_and_still_groups_lengths():
    # Length predicts the label here (as in SMS spam): plain bucketing makes one-class batches.
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(512)]
    lengths = [int(rng.integers(5, 30)) + 40 * y for y in labels]
    plain = epoch_batches(lengths, 8, seed=1, epoch=1)
    mixed = epoch_batches(lengths, 8, seed=1, epoch=1, labels=labels)
    random = epoch_batches(lengths, 8, seed=1, epoch=1, window_batches=1)
    assert sorted(int(i) for b in mixed for i in b) == list(range(512))

    def one_class(batches):
        return sum(len({labels[i] for i in b}) == 1 for b in batches)

    def spread_within_class(batches):
        spreads = [
            max(lengths[i] for i in b if labels[i] == y) - min(lengths[i] for i in b if labels[i] == y)
            for b in batches
            for y in {labels[i] for i in b}
        ]
        return sum(spreads) / len(spreads)

    assert one_class(plain) > 50 and one_class(mixed) == 0
    assert all(abs(sum(labels[i] for i in b) - 4) <= 1 for b in mixed)  # the window's 50/50, per batch
    # The rows of one class in a batch are close in length (random batches: spread over the whole range).
    assert spread_within_class(mixed) < spread_within_class(random) / 5


def test_bf16_predictions_agree_with_fp32(tiny_gpt2_config):
    from lorafit.devices import autocast, cast_frozen_weights

    model = _tiny_classifier(tiny_gpt2_config)
    rows = [[10, 20, 30, 40], [50, 60], [70, 80, 90, 100, 110]]
    with torch.no_grad():
        fp32 = torch.softmax(model(*collate(rows, 50256)), -1)
        cast_frozen_weights(model, torch.bfloat16)
        # The frozen token table goes to bf16; the position table stays fp32, and so does the residual stream.
        assert model.backbone.wte.weight.dtype == torch.bfloat16
        assert model.backbone.wpe.weight.dtype == torch.float32
        with autocast(torch.device("cpu"), "bf16"):
            assert model.backbone.wte(torch.tensor([10])).dtype == torch.bfloat16
            assert model.backbone.hidden_states(*collate(rows, 50256)).dtype == torch.float32
            bf16 = torch.softmax(model(*collate(rows, 50256)), -1)
    assert (fp32 - bf16).abs().max().item() < 0.02
    assert fp32.argmax(-1).tolist() == bf16.argmax(-1).tolist()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_backbone_cast_whole_to_bf16_predicts_without_autocast_what_autocast_predicts(
    tiny_gpt2_config, pooling
):
    from lorafit.devices import cast_for_inference, cast_frozen_weights
    from lorafit.train import predict_logits

    model = _tiny_classifier(tiny_gpt2_config, pooling)
    rows = [[10, 20, 30, 40], [50, 60], [70, 80, 90, 100, 110], [5] * 40]
    fp32 = predict_logits(
        model, rows, pad_id=50256, batch_size=4, device=torch.device("cpu"), precision="fp32"
    )
    cast_frozen_weights(model, torch.bfloat16)
    autocast = predict_logits(
        model, rows, pad_id=50256, batch_size=4, device=torch.device("cpu"), precision="bf16"
    )
    cast_for_inference(model)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}  # LayerNorms and LoRA too
    assert model.head.weight.dtype == torch.float32
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    for batch_size in (4, 1):  # packed rows, and one padded row per text
        whole = predict_logits(
            model, rows, pad_id=50256, batch_size=batch_size, device=torch.device("cpu"), precision="bf16"
        )
        # No autocast: the fp32 head gets fp32 features (an autocast head would have computed in bf16).
        assert set(seen) == {(torch.float32, torch.float32)}
        for other in (autocast, fp32):
            assert (whole.softmax(-1) - other.softmax(-1)).abs().max().item() < 0.02
            assert whole.argmax(-1).tolist() == other.argmax(-1).tolist()


# The bad-option matrix and its real-process cases live in test_bad_input.py.


def test_unknown_option_is_one_line(capsys):
    code, _, stderr = run_main(["train", "--bogus"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--bogus" in stderr


def test_pretrained_gpt2_offline_is_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--model", "gpt2", "--weights", "pretrained", "--data", "sms-spam"],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_CACHE": "/nonexistent-lorafit"},
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--weights PATH" in result.stderr


def test_recipe_seed_sets_the_lab_protocol(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--recipe", "seed", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--out", str(out),
          "--precision", "fp32"])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["split"] == [0.8, 0.1, 0.1] and config["data"]["balance"] is True
    assert (
        config["train"]["epochs"] == 1
        and config["train"]["batch_size"] == 8
        and config["train"]["seed"] == 42
    )
    assert config["lora"]["rank"] == 8 and config["lora"]["alpha"] == 16
    metrics = json.loads((out / "metrics.json").read_text())
    # 40 spam + 40 ham after balancing the 120 synthetic rows -> 64 / 8 / 8
    assert (metrics["train"]["count"], metrics["val"]["count"], metrics["test"]["count"]) == (64, 8, 8)


def test_corrupt_adapter_is_a_clear_error(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, sms_file, out, "--epochs", "1")
    adapter = out / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    code, _, stderr = run_main(["predict", "--run", out, "hello"], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "truncated or corrupt" in stderr


def test_adapter_refuses_a_different_base(tiny_gpt2_dir, sms_file, tmp_path, capsys, tiny_gpt2_config):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, sms_file, out, "--epochs", "1")
    assert len(json.loads((out / "config.json").read_text())["model"]["sha256"]) == 64
    torch.manual_seed(123)  # other base weights of the same shapes, at the same path
    other = GPT2(tiny_gpt2_config)
    state = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}
    save_file(
        gpt2_state_dict_to_hf(state, tiny_gpt2_config.n_layer), str(tiny_gpt2_dir / "model.safetensors")
    )
    code, _, stderr = run_main(["predict", "--run", out, "hello"], capsys)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "refusing to mix them" in stderr


def test_eval_refuses_unknown_labels(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(tiny_gpt2_dir, sms_file, out, "--epochs", "1")
    capsys.readouterr()
    other = tmp_path / "other.tsv"
    other.write_text("ham\tsee you soon\npromo\tbig sale today\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["eval", "--run", str(out), "--data", str(other)])
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "label 'promo' was not among the run's labels (ham, spam)" in error[0]


def test_train_run_sends_every_line_to_its_log(tiny_gpt2_dir, sms_file, tmp_path, capsys):
    from lorafit.config import TrainConfig
    from lorafit.run import DataOptions, RunOptions, train_run

    lines = []
    options = RunOptions(
        model=str(tiny_gpt2_dir),
        train=TrainConfig(epochs=1, precision="fp32", log_every=5),
        data=DataOptions(source=str(sms_file)),
        out=str(tmp_path / "run"),
    )
    train_run(options, log=lines.append)
    assert any(line.startswith("Epoch 1 | Batch 5 | Loss:") for line in lines), lines
    assert any(line.startswith("Validation | Loss:") for line in lines), lines
    assert "Epoch 1 | Batch" not in capsys.readouterr().out  # the API's caller decides where lines go


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_activation_checkpointing_gives_the_same_gradients(family, tiny_gpt2_config):
    """Recomputing the blocks in backward changes memory, not the result: same loss and LoRA gradients,
    with dropout on (checkpoint replays the same dropout masks)."""
    from lorafit.config import BertConfig

    if family == "gpt2":
        backbone = GPT2(dataclasses.replace(tiny_gpt2_config, dropout=0.1))
    else:
        from lorafit.models.bert import Bert

        backbone = Bert(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64))  # fmt: skip
    torch.manual_seed(0)
    model = SequenceClassifier(backbone, 2, "last" if family == "gpt2" else "mean")
    apply_lora(model.backbone, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    for p in model.head.parameters():
        p.requires_grad_(True)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the A gradients non-trivial too
        if name.endswith(".B"):
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    model.train()

    def loss_and_grads(checkpointing: bool):
        model.backbone.activation_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(1)
        saved = []  # tensors the autograd graph keeps for backward (checkpointed blocks keep their own)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, sum(saved)

    plain_loss, plain, plain_saved = loss_and_grads(False)
    loss, grads, saved = loss_and_grads(True)
    assert saved < plain_saved / 3  # the blocks' activations were not kept
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    assert plain.keys() == grads.keys() and any(n.endswith(".A") for n in grads)
    for name in plain:
        assert torch.allclose(grads[name], plain[name], atol=1e-6), name
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith(".A"))


@pytest.fixture
def fresh_bf16_verdict():
    """`cpu_bf16_verdict` is measured once per process: clear it around a test that fakes what it sees."""
    import lorafit.devices

    lorafit.devices.cpu_bf16_verdict.cache_clear()
    yield lorafit.devices
    lorafit.devices.cpu_bf16_verdict.cache_clear()


def test_auto_precision_says_why_it_chose_fp32(
    tiny_gpt2_dir, sms_file, tmp_path, capsys, monkeypatch, fresh_bf16_verdict
):
    monkeypatch.setattr(fresh_bf16_verdict, "cpu_bf16_flags", lambda: False)
    train_tiny(tiny_gpt2_dir, sms_file, tmp_path / "run", "--precision", "auto", "--epochs", "1")
    printed = capsys.readouterr().out
    assert "precision: fp32 (this CPU has no fast bf16: no AVX-512 BF16 / AMX)" in printed


@pytest.mark.parametrize("speedup, expected", [(0.61, "fp32"), (1.49, "fp32"), (1.5, "bf16"), (4.2, "bf16")])
def test_auto_precision_takes_bf16_only_where_its_products_measure_fast(
    speedup, expected, monkeypatch, fresh_bf16_verdict
):
    """A hypervisor can expose AVX-512 BF16 without AMX: there bf16 products ran 0.6x fp32's speed, so the
    flags alone must not pick bf16."""
    devices = fresh_bf16_verdict
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: True)
    monkeypatch.setattr(devices, "bf16_matmul_speedup", lambda: speedup)
    assert devices.resolve_precision("auto", torch.device("cpu")) == expected
    assert devices.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: never overridden
    if expected == "fp32":
        assert f"bf16 products ran {speedup:.2f}x fp32's speed" in devices.cpu_bf16_verdict()[1]


def test_the_bf16_speedup_is_measured_here(monkeypatch, fresh_bf16_verdict):
    """The measurement runs real products (both dtypes timed; not a constant) and no flags, no measuring."""
    devices = fresh_bf16_verdict
    calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda x, w: calls.append(x.dtype) or real_linear(x, w)
    )
    speedup = devices.bf16_matmul_speedup(rows=32, width=64, repeats=3)
    assert 0 < speedup < float("inf")
    assert calls.count(torch.float32) == calls.count(torch.bfloat16) == 5
    calls.clear()
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: False)
    assert devices.cpu_bf16_verdict()[0] is False and calls == []


def test_ema_validates_keeps_and_returns_the_moving_average(tiny_gpt2_config):
    """With `ema`, the weights validated after each epoch and left in the model are the moving average of
    the raw weights after every optimiser step (TensorFlow's warm-up rule), not the last step's."""
    from lorafit.train import Split, evaluate, fit

    model = _tiny_classifier(tiny_gpt2_config).train()
    generator = torch.Generator().manual_seed(3)
    rows = [
        torch.randint(0, 50000, (int(n),), generator=generator).tolist() for n in torch.randint(2, 12, (24,))
    ]
    labels = [i % 2 for i in range(24)]
    train, val = Split(rows[:16], labels[:16]), Split(rows[16:], labels[16:])
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    start = {name: p.detach().clone() for name, p in named}
    raw_after_step = []  # mid-epoch checkpoints hold the raw weights (and the average so far)

    def checkpoint(state):
        if state["batch"]:
            raw_after_step.append(state["trainable"])
        else:  # the epoch end, after the last epoch: the model holds the average, the state the raw weights
            raw_after_step.append(state["ema"])

    config = TrainConfig(epochs=1, batch_size=4, lr=3e-2, ema=0.6, keep_best=False, scheduler="constant",
                         warmup=0.0, seed=5, precision="fp32")  # fmt: skip
    history = fit(
        model, train, val, ["ham", "spam"], config, pad_id=50256, device=torch.device("cpu"),
        precision="fp32", print_fn=lambda line: None, checkpoint=checkpoint, checkpoint_every=1,
    )  # fmt: skip
    assert len(raw_after_step) == 4  # 16 rows in batches of 4: 3 mid-epoch checkpoints and the epoch end
    expected = {name: t.clone() for name, t in start.items()}
    for step, raw in enumerate(raw_after_step, start=1):
        decay = min(0.6, (1 + step) / (10 + step))
        for name in expected:
            expected[name] = decay * expected[name] + (1 - decay) * raw[name]
    last_raw = raw_after_step[-1]
    for name, p in named:
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name
        assert not torch.allclose(p.detach(), last_raw[name], atol=1e-4), (
            name
        )  # the average, not the last step
    again = evaluate(model, val.rows, val.labels, ["ham", "spam"], pad_id=50256, batch_size=8,
                     device=torch.device("cpu"), precision="fp32")  # fmt: skip
    assert again["loss"] == pytest.approx(history[-1]["val_loss"], abs=1e-6)  # validation saw the average


def test_ema_run_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(tiny_gpt2_config):
    from lorafit.train import Split, fit

    generator = torch.Generator().manual_seed(4)
    rows = [
        torch.randint(0, 50000, (int(n),), generator=generator).tolist() for n in torch.randint(2, 12, (28,))
    ]
    labels = [i % 2 for i in range(28)]
    train, val = Split(rows[:20], labels[:20]), Split(rows[20:], labels[20:])
    config = TrainConfig(epochs=2, batch_size=4, lr=3e-2, ema=0.7, keep_best=True, scheduler="linear",
                         warmup=0.1, seed=5, precision="fp32")  # fmt: skip
    states = []

    def run(model, **extra):
        torch.manual_seed(config.seed)
        return fit(
            model, train, val, ["ham", "spam"], config, pad_id=50256, device=torch.device("cpu"),
            precision="fp32", print_fn=lambda line: None, **extra,
        )  # fmt: skip

    whole = _tiny_classifier(tiny_gpt2_config).train()
    # As saved to disk: a copy (the optimiser state and history in `state` are live references).
    history = run(whole, checkpoint=lambda state: states.append(copy.deepcopy(state)), checkpoint_every=1)
    mid_second_epoch = next(s for s in states if s["epoch"] == 2 and s["batch"] == 2)
    assert mid_second_epoch["ema"] and mid_second_epoch["ema_updates"] == 7
    resumed = _tiny_classifier(tiny_gpt2_config).train()

    assert without_wall_time(run(resumed, resume=mid_second_epoch)) == without_wall_time(history)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_patience_stops_early_keeps_the_best_epoch_and_resumes_to_the_same_stop(
    tiny_gpt2_config, monkeypatch
):
    import lorafit.train as train_module
    from lorafit.config import resolve_train_config
    from lorafit.train import Split, fit

    generator = torch.Generator().manual_seed(6)
    rows = [
        torch.randint(0, 50000, (int(n),), generator=generator).tolist() for n in torch.randint(2, 12, (16,))
    ]
    train, val = Split(rows[:12], [i % 2 for i in range(12)]), Split(rows[12:], [0, 1, 0, 1])
    scripted = {}  # epoch -> validation loss: the best at epoch 2, then two epochs without a lower one
    losses = {1: 0.5, 2: 0.4, 3: 0.45, 4: 0.4, 5: 0.3}

    def scripted_evaluate(*args, **kwargs):
        epoch = len(scripted) + 1
        scripted[epoch] = losses[epoch]
        return {"loss": losses[epoch], "accuracy": 0.5}

    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
    config = resolve_train_config(TrainConfig(epochs=5, batch_size=4, lr=3e-2, patience=2, seed=5,
                                              precision="fp32"), "gpt2")  # fmt: skip
    assert config.keep_best  # --patience keeps the best epoch unless --no-keep-best says otherwise
    assert not resolve_train_config(TrainConfig(patience=2, keep_best=False), "gpt2").keep_best
    assert not resolve_train_config(TrainConfig(), "gpt2").keep_best  # the lab's default is untouched
    states, lines = [], []

    def run(model, **extra):
        torch.manual_seed(config.seed)
        return fit(
            model, train, val, ["ham", "spam"], config, pad_id=50256, device=torch.device("cpu"),
            precision="fp32", print_fn=lines.append, **extra,
        )  # fmt: skip

    model = _tiny_classifier(tiny_gpt2_config).train()
    history = run(model, checkpoint=lambda state: states.append(copy.deepcopy(state)))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # epoch 4 tied epoch 2: not lower, so no reset
    assert any(line.startswith("Stopping early: the validation loss has not fallen below epoch 2's for 2 epochs")
               for line in lines)  # fmt: skip
    assert any(line.startswith("Keeping epoch 2 ") for line in lines)
    after_epoch_2 = next(s for s in states if s["epoch"] == 3 and s["batch"] == 0)["trainable"]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), after_epoch_2[name]), name
    # The checkpoint written at the stop resumes to the same end without training or validating again.
    scripted.clear()
    resumed = _tiny_classifier(tiny_gpt2_config).train()
    assert without_wall_time(run(resumed, resume=states[-1])) == without_wall_time(history)
    assert scripted == {}
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # Without patience every epoch runs.
    scripted.clear()
    config.patience = 0
    assert len(run(_tiny_classifier(tiny_gpt2_config).train())) == 5


def test_an_early_stop_with_ema_ends_on_the_average_it_validated(tiny_gpt2_config, monkeypatch):
    import lorafit.train as train_module
    from lorafit.train import Split, fit

    generator = torch.Generator().manual_seed(7)
    rows = [
        torch.randint(0, 50000, (int(n),), generator=generator).tolist() for n in torch.randint(2, 12, (16,))
    ]
    train, val = Split(rows[:12], [i % 2 for i in range(12)]), Split(rows[12:], [0, 1, 0, 1])
    validated = []  # the trainable weights each validation saw

    def scripted_evaluate(model, *args, **kwargs):
        validated.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return {"loss": (0.5, 0.6)[len(validated) - 1], "accuracy": 0.5}

    monkeypatch.setattr(train_module, "evaluate", scripted_evaluate)
    config = TrainConfig(epochs=4, batch_size=4, lr=3e-2, ema=0.6, keep_best=False, patience=1,
                         scheduler="constant", warmup=0.0, seed=5, precision="fp32")  # fmt: skip
    model = _tiny_classifier(tiny_gpt2_config).train()
    history = fit(model, train, val, ["ham", "spam"], config, pad_id=50256, device=torch.device("cpu"),
                  precision="fp32", print_fn=lambda line: None)  # fmt: skip
    assert len(history) == 2  # no fall after epoch 1: stopped after epoch 2 of 4
    for name, p in model.named_parameters():
        if p.requires_grad:  # the moving average validated at the stop, not the raw weights under it
            assert torch.equal(p.detach(), validated[-1][name]), name


@pytest.mark.parametrize("val_losses, hint", [((0.5, 0.4, 0.3), True), ((0.5, 0.3, 0.4), False)])
def test_keep_best_suggests_more_epochs_only_when_the_last_epoch_validated_best(val_losses, hint):
    from types import SimpleNamespace

    from lorafit.train import _keep_best

    weight = torch.nn.Parameter(torch.zeros(2))
    best = val_losses.index(min(val_losses)) + 1
    state = SimpleNamespace(
        named=[("w", weight)],
        best_state={"w": torch.full((2,), float(best))},
        best_loss=min(val_losses),
        history=[{"epoch": i + 1, "val_loss": loss} for i, loss in enumerate(val_losses)],
    )
    lines = []
    _keep_best(state, TrainConfig(keep_best=True), lines.append)
    assert lines[0].startswith(f"Keeping epoch {best} ")
    assert torch.equal(weight.detach(), torch.full((2,), float(best)))
    assert any("more --epochs may help" in line for line in lines) == hint
    from lorafit.train import kept_epoch

    assert kept_epoch(state.history, keep_best=True) == best
    assert kept_epoch(state.history, keep_best=False) == 3


def test_progress_bars_redraw_rarely_into_a_log_file(monkeypatch):
    import io

    from lorafit.train import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, interval in ((io.StringIO(), 30.0), (Terminal(), 0.1)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(total=3, desc="x")
        assert bar.mininterval == interval
        bar.close()
    monkeypatch.setenv("TQDM_MININTERVAL", "2")  # the user's choice rules: no 30 s of ours
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(total=3).mininterval == 0.1  # tqdm's, which reads TQDM_* when it is imported


def test_plots_mark_the_kept_epoch_only_when_it_is_not_the_last(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorafit.plots import _mark_kept, plot_accuracy, plot_loss

    epochs = [{"epoch": i, "train_loss": 0.5 / i, "val_loss": 0.3, "train_accuracy": 0.9, "val_accuracy": 0.9}
              for i in (1, 2, 3)]  # fmt: skip
    for kept, marked in ((2, True), (3, False), (None, False)):
        fig, ax = plt.subplots()
        _mark_kept(ax, epochs, kept)
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == (["weights kept: epoch 2"] if marked else []), labels
        plt.close(fig)
    plot_loss(epochs, [], tmp_path / "loss.png", kept=2)
    plot_accuracy(epochs, tmp_path / "accuracy.png", kept=2)
    assert (
        (tmp_path / "loss.png").read_bytes()[:4] == (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    )


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    import lorafit.run

    monkeypatch.setattr(lorafit.run.time, "strftime", lambda fmt: "20261206-120000")
    names = [lorafit.run.new_run_directory(tmp_path / "runs") for _ in range(3)]
    assert [Path(n).name for n in names] == ["20261206-120000", "20261206-120000-2", "20261206-120000-3"]
    assert all(Path(n).is_dir() for n in names)

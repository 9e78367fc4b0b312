"""`--precision int8`: a training step's frozen products in int8 (int8.py), checked against the fp32 path."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_main

from lorafit.errors import LorafitError
from lorafit.int8 import OUTLIER_THRESHOLD, Int8Linear, int8_available, int8_linear, use_int8_products

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no fbgemm (x86 only)")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_an_int8_product_is_close_to_fp32_forward_and_backward_and_exact_without_autograd() -> None:
    torch.manual_seed(0)
    owner = torch.nn.Linear(64, 96)
    owner.requires_grad_(False)
    x = torch.randn(5, 8, 64)
    x[..., 7] *= 4 * OUTLIER_THRESHOLD  # an outlier feature: its column runs in fp32
    x.requires_grad_(True)
    grad = torch.randn(5, 8, 96)
    exact = F.linear(x, owner.weight, owner.bias)
    (exact_grad,) = torch.autograd.grad(exact, x, grad)
    ours = int8_linear(x, owner.weight, owner.bias, owner)
    (our_grad,) = torch.autograd.grad(ours, x, grad)
    assert ours.shape == exact.shape and our_grad.shape == exact_grad.shape
    assert 1e-4 < relative(ours, exact) < 0.02  # int8 indeed, and close
    assert 1e-4 < relative(our_grad, exact_grad) < 0.03
    with torch.no_grad():  # evaluation / prediction: plain fp32
        assert torch.equal(
            int8_linear(x, owner.weight, owner.bias, owner), F.linear(x, owner.weight, owner.bias)
        )


def test_a_weight_changed_in_place_is_packed_again() -> None:
    torch.manual_seed(0)
    owner = torch.nn.Linear(32, 16, bias=False)
    owner.requires_grad_(False)
    x = torch.randn(10, 32, requires_grad=True)
    before = int8_linear(x, owner.weight, None, owner)
    with torch.no_grad():
        owner.weight.mul_(2)  # as a LoRA merge changes it
    after = int8_linear(x, owner.weight, None, owner)
    assert relative(after, 2 * before) < 1e-5
    assert relative(after, F.linear(x, owner.weight)) < 0.02


def tiny_lora_gpt2(tiny_gpt2_config, int8: bool):
    from lorafit.classifier import SequenceClassifier
    from lorafit.config import LoRAConfig
    from lorafit.lora import apply_lora, fuse_shared_input_weights, lora_modules
    from lorafit.models.gpt2 import GPT2

    torch.manual_seed(0)
    backbone = GPT2(tiny_gpt2_config)
    backbone.requires_grad_(False)
    apply_lora(backbone, LoRAConfig(rank=4, alpha=8))
    fuse_shared_input_weights(backbone)
    model = SequenceClassifier(backbone, 2, "last")
    generator = torch.Generator().manual_seed(1)
    for module in lora_modules(model):  # a trained-looking B, so that A gets gradients too
        module.B.data = torch.randn(module.B.shape, generator=generator) * 0.05
    if int8:
        assert use_int8_products(model) == 6 * tiny_gpt2_config.n_layer
    return model


def test_an_int8_gpt2_step_gives_the_fp32_logits_loss_and_lora_gradients_within_int8_error(
    tiny_gpt2_config,
) -> None:
    from lorafit.batching import collate_packed
    from lorafit.lora import lora_modules

    texts = [[100 + 13 * i + j for j in range(5 + 3 * i)] for i in range(6)]
    inputs = collate_packed(texts, 50256)
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    results = []
    for int8 in (False, True):
        model = tiny_lora_gpt2(tiny_gpt2_config, int8)
        logits = model(inputs[0], None, *inputs[1:])
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        grads = torch.cat([torch.cat([m.A.grad.flatten(), m.B.grad.flatten()]) for m in lora_modules(model)])
        with torch.no_grad():
            evaluation = model(inputs[0], None, *inputs[1:])
        results.append((logits.detach(), loss.item(), grads, evaluation, model))
    (logits, loss, grads, evaluation, _), (logits8, loss8, grads8, evaluation8, model8) = results
    assert 1e-5 < relative(logits8, logits) < 0.05
    assert abs(loss8 - loss) < 0.02 * loss
    assert 1e-5 < relative(grads8, grads) < 0.1
    assert F.cosine_similarity(grads8, grads, 0) > 0.995
    assert torch.equal(evaluation8, evaluation)  # no autograd: exactly the fp32 model
    query = model8.backbone.blocks[0].attn.query.base
    assert isinstance(query, Int8Linear)
    fused = [shape for _, shape in query.__dict__["_int8_packs"]]
    assert fused == [(3 * tiny_gpt2_config.d_model, tiny_gpt2_config.d_model)]  # q, k, v: one int8 product


def test_train_with_precision_int8_writes_a_run_that_predicts_in_fp32(
    tmp_path, tiny_gpt2_dir, sms_file, capsys
) -> None:
    from lorafit.run import load_classifier

    out = tmp_path / "run"
    code, stdout, stderr = run_main(
        ["train", "--model", str(tiny_gpt2_dir), "--data", str(sms_file), "--epochs", "1", "--out", str(out),
         "--precision", "int8", "--examples", "0"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert "precision: int8" in stdout
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "int8"
    classifier = load_classifier(out)
    assert classifier.precision in ("fp32", "bf16")
    assert len(classifier.predict(["WIN cash now", "see you at dinner"])) == 2
    with pytest.raises(LorafitError, match="precision int8 is for training"):
        load_classifier(out, precision="int8")


def test_precision_int8_refuses_a_device_other_than_the_cpu() -> None:
    from lorafit.devices import resolve_precision

    with pytest.raises(LorafitError, match="int8 runs on the CPU only"):
        resolve_precision("int8", torch.device("meta"))
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
